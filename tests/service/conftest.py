"""Stores for the service's tests: a SQLite file, and a fresh schema on the PostgreSQL
server of the project's machines (skipped, with the reason, where none answers)."""

from __future__ import annotations

import os
import secrets

import pytest

from corral.service.store import Store

PG_URL = os.environ.get("CORRAL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _postgres_schema() -> tuple[str, str]:
    """A new, empty schema on the test server: its name, and a URL that uses it."""
    try:
        import psycopg

        with psycopg.connect(PG_URL, connect_timeout=3, autocommit=True) as conn:
            name = f"corral_{secrets.token_hex(4)}"
            conn.execute(f"CREATE SCHEMA {name}")
    except Exception as exc:
        pytest.skip(f"no PostgreSQL at {PG_URL}: {type(exc).__name__}: {str(exc)[:80]}")
    return name, f"{PG_URL}?options=-csearch_path%3D{name}"


def _drop_schema(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'corral.db'}"
        return
    name, url = _postgres_schema()
    try:
        yield url
    finally:
        _drop_schema(name)


@pytest.fixture
def store(store_url):
    s = Store(store_url)
    yield s
    s.close()
