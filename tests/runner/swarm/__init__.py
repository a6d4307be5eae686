"""Tests of the Swarm backend (runner/backends/swarm*.py) on the real swarm of scripts/swarm-fixture."""
