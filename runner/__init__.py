"""Runtimes: the state machine, backends, the agent channel, idle shutdown, reconciliation."""
