"""Saves: a runtime's filesystem becoming a new version of an environment.

``snapshots.py`` saves (``insave.py``: a save made inside the runtime); ``changes.py`` lists
what changed, ``scans.py`` what a save leaves out and refuses; ``drafts.py`` keeps unsaved
changes across stops; ``imageconfig.py`` is the trusted configuration of what is saved;
``builds.py`` builds spec files; ``archives.py`` exports and loads versions with their lineage.
"""
