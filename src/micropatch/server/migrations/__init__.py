"""Alembic migrations of the server database (run by `server.database.migrate`)."""
