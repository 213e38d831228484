"""Fixtures shared by every suite: one PostgreSQL server per test session.

``DATABASE_URL`` (a superuser DSN) selects an external server; otherwise an embedded PostgreSQL
(the ``pgserver`` wheel) is started in a temporary directory and stopped at the end of the session.
Suites create their own databases on it (see ``pyapp.db.create_database``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def postgres_admin_dsn() -> Iterator[str]:
    external = os.environ.get("DATABASE_URL")
    if external:
        yield external
        return
    import pgserver

    # Not under pytest's tmp_path: as root, pgserver runs PostgreSQL as its own user, which cannot
    # traverse pytest's 0700 base directory.
    base = Path(tempfile.mkdtemp(prefix="pytest-pg-"))
    server = pgserver.get_server(base / "pgdata", cleanup_mode="stop")
    # A throw-away test server: durability buys nothing, speed does (CREATE DATABASE per test).
    server.psql(
        "ALTER SYSTEM SET fsync = off; ALTER SYSTEM SET synchronous_commit = off;"
        " ALTER SYSTEM SET full_page_writes = off; SELECT pg_reload_conf();"
    )
    try:
        yield str(server.get_uri("postgres"))
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)
