"""Tests of the backends' own behaviour (runner/backends/): the contract, overlay reading, networks
and fences, GPUs, an engine that does not answer, neighbours on one engine."""
