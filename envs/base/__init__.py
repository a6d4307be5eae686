"""Base images: the roots of every environment's lineage, built from scratch and described as data.

One module a concern (import them by name; this ``__init__`` imports nothing):

- ``recipes``: one image's ``recipe.yaml``, parsed and checked (pure data);
- ``hierarchy``: ``hierarchy.yaml`` and the recipe folders as a family: recipe digests, build
  order, lineage, each image's trusted configuration (pure data);
- ``host``: what the build machine gives: its Debian mirror and extra CA certificates;
- ``progress``: the build's typed progress events;
- ``rootfs``: a root image: debootstrap, certificates, ``docker import``;
- ``child``: a child image: steps in a container of the parent, one committed layer;
- ``build``: ``build()`` and ``verify_image()``: reuse by recipe digest, build, check, verify.

Engine work goes through ``envs.images``, the image layer the Docker backend uses too.
``envctl base build`` calls ``envs.base.build.build``; ``base-images/README.md`` describes the
recipes for people.
"""
