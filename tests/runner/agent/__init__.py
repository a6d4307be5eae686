"""Tests of the agent in a runtime (runner/agent/), its channel and handshake."""
