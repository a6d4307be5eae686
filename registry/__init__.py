"""Users, API tokens and teams; the managed registry and its token server; the catalog of
published versions, team events and the registry's garbage."""
