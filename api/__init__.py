"""The REST API (FastAPI), the envctl command line, and the Alembic migrations."""
