"""Alembic migrations of the service's schema (run by `Store` when it opens a database)."""
