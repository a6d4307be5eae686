"""Tests of runtimes (runner/runtimes/): states, idle, leases, settings, the warm pool, attach, recovery, secrets."""
