"""Transfers: versions to and from registries.

``pushpull.py`` pushes a version after a save and pulls one before a boot, through this
installation's registry (``registry/image_transfer.py`` does the engine's side); ``imports.py``
brings a version of another envctl server.
"""
