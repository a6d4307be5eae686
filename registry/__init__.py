"""Teams, users and API tokens; later the catalog of published versions and the token server."""
