"""Apps: a notebook deployed as a web application (runner/apps/deploy.py has the overview)."""
