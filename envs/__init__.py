"""Environments: reference grammar, versions and tags, lineage, base images and builds."""
