"""Fixtures: a fresh feedback database on SQLite and on PostgreSQL (its own schema per test,
dropped afterwards, so parallel runs never collide)."""

import secrets

import pytest

from cherrytop.feedback.store import open_store

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _pg_admin():
    import psycopg
    return psycopg.connect(PG.replace("+psycopg", ""), autocommit=True, connect_timeout=5)


@pytest.fixture
def pg_url():
    """A PostgreSQL URL whose search_path is a fresh schema (dropped after the test)."""
    schema = f"ct_fb_{secrets.token_hex(6)}"
    with _pg_admin() as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG}?options=-csearch_path%3D{schema}"
    finally:
        with _pg_admin() as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'feedback.db'}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url):
    s = open_store(db_url)
    yield s
    s.close()
