"""Image work in the Docker engine, shared by base-image builds and the Docker backend.

- ``config``: pure functions over image configurations: the trusted template of a child image
  and the one check that a made image's configuration is the template (R10). No Docker here.
- ``docker``: the engine operations (import a root filesystem, commit with a given config,
  inspect, remove, save and load archives, squash), with the Docker SDK's and CLI's errors
  translated into envctl's (``raise ... from exc``, the engine's message kept).
- ``rewrite``: replace a committed image's configuration and history (save, edit, load),
  for images that must not record the container they were committed from.
- ``layers``: an image made of layers the engine has plus one new layer streamed in (a save
  whose layer envctl made itself: caches left out, scanned before the engine keeps it).

Nothing here imports ``registry``, ``runner`` or ``api``; the submodules are imported by name
(this package's ``__init__`` imports nothing, so ``config`` stays free of the Docker SDK).
"""
