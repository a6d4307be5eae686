"""Tests of mounts (runner/mounts/): validation, git and S3 caches, preparation at boot."""
