"""PostgreSQL for trio services: asyncpg behind the trio-asyncio bridge.

asyncpg speaks asyncio only. This module is the one place in the project that touches asyncio:
:func:`open_database` opens a trio-asyncio loop and an asyncpg pool inside it and hands back a
:class:`Database` whose methods are plain trio coroutines. The loop is passed explicitly to every
call, so any trio task may use the database (request handlers are not children of the task that
opened it and do not inherit its context).

Also here: numbered SQL migrations applied under a PostgreSQL advisory lock (several processes may
start at once against one database), the embedded server (``pgserver``) used when no database URL
is configured, and ``CREATE DATABASE`` for tests and first start.

SQL is always sent with parameters (``$1``...), never by string formatting of values.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar, cast

import asyncpg  # type: ignore[import-untyped]
import trio
import trio_asyncio  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class Record(Protocol):
    """What the code relies on of ``asyncpg.Record`` (a read-only mapping)."""

    def __getitem__(self, key: str | int, /) -> Any: ...
    def get(self, key: str, default: Any = None, /) -> Any: ...
    def keys(self) -> Iterable[str]: ...
    def values(self) -> Iterable[Any]: ...
    def items(self) -> Iterable[tuple[str, Any]]: ...
    def __len__(self) -> int: ...


UniqueViolation = asyncpg.UniqueViolationError
ForeignKeyViolation = asyncpg.ForeignKeyViolationError
PostgresError = asyncpg.PostgresError

# One advisory lock key for "migrations of this database" (any constant 64-bit value works).
MIGRATION_LOCK_KEY = 0x6F6D615F6D696772  # "oma_migr"
_MIGRATION_NAME = re.compile(r"^(\d{3,})_[A-Za-z0-9_]+\.sql$")


class _Bridge:
    """Runs asyncpg coroutines on one trio-asyncio loop from any trio task."""

    def __init__(self, loop: Any) -> None:
        self._loop = loop

    async def run(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        result: T = await trio_asyncio.aio_as_trio(fn, loop=self._loop)(*args, **kwargs)
        return result


class Connection:
    """One pooled connection held by a trio task (inside :meth:`Database.transaction`)."""

    def __init__(self, bridge: _Bridge, conn: asyncpg.Connection) -> None:
        self._bridge = bridge
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> str:
        return cast(str, await self._bridge.run(self._conn.execute, sql, *args))

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        await self._bridge.run(self._conn.executemany, sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[Record]:
        return cast(list[Record], await self._bridge.run(self._conn.fetch, sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Record | None:
        return cast(Record | None, await self._bridge.run(self._conn.fetchrow, sql, *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._bridge.run(self._conn.fetchval, sql, *args)


class Database:
    """A pool of connections usable from trio. Create with :func:`open_database`."""

    def __init__(self, bridge: _Bridge, pool: asyncpg.Pool) -> None:
        self._bridge = bridge
        self._pool = pool

    async def execute(self, sql: str, *args: Any) -> str:
        return cast(str, await self._bridge.run(self._pool.execute, sql, *args))

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        await self._bridge.run(self._pool.executemany, sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[Record]:
        return cast(list[Record], await self._bridge.run(self._pool.fetch, sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Record | None:
        return cast(Record | None, await self._bridge.run(self._pool.fetchrow, sql, *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._bridge.run(self._pool.fetchval, sql, *args)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        conn = await self._bridge.run(self._pool.acquire)
        try:
            yield Connection(self._bridge, conn)
        finally:
            with trio.CancelScope(shield=True):
                await self._bridge.run(self._pool.release, conn)

    @contextlib.asynccontextmanager
    async def transaction(self, isolation: str = "read_committed") -> AsyncIterator[Connection]:
        """A connection inside a transaction: committed on normal exit, rolled back on error."""
        async with self.connection() as conn:
            tx = conn._conn.transaction(isolation=isolation)
            await self._bridge.run(tx.start)
            try:
                yield conn
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._bridge.run(tx.rollback)
                raise
            else:
                await self._bridge.run(tx.commit)

    def pool_stats(self) -> dict[str, int]:
        return {
            "size": self._pool.get_size(),
            "idle": self._pool.get_idle_size(),
            "min_size": self._pool.get_min_size(),
            "max_size": self._pool.get_max_size(),
        }


@contextlib.asynccontextmanager
async def open_database(dsn: str, *, min_size: int = 2, max_size: int = 10) -> AsyncIterator[Database]:
    """Open a trio-asyncio loop and an asyncpg pool on ``dsn`` for the duration of the block."""
    async with trio_asyncio.open_loop() as loop:
        bridge = _Bridge(loop)
        pool = await bridge.run(
            asyncpg.create_pool, dsn, min_size=min_size, max_size=max_size, command_timeout=30
        )
        try:
            yield Database(bridge, pool)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await bridge.run(pool.close)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(directory: Path) -> list[Migration]:
    """``NNN_name.sql`` files of ``directory`` in version order; duplicate versions are an error."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise ValueError(f"two migrations with version {version}: {found[version].name}, {path.name}")
        found[version] = Migration(version, path.name, path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def apply_migrations(db: Database, migrations: Sequence[Migration]) -> list[int]:
    """Apply the migrations not yet recorded, each in its own transaction, under an advisory lock.

    Returns the versions applied by this call (empty when the schema was already current).
    """
    applied: list[int] = []
    async with db.connection() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for migration in migrations:
                if migration.version in done:
                    continue
                await conn.execute("BEGIN")
                try:
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
                    await conn.execute("COMMIT")
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await conn.execute("ROLLBACK")
                    raise
                log.info("applied migration %s", migration.name, extra={"action": "db_migrate"})
                applied.append(migration.version)
        finally:
            with trio.CancelScope(shield=True):
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied


_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


async def create_database(admin_dsn: str, name: str) -> None:
    """``CREATE DATABASE name`` unless it exists (identifiers cannot be bound as parameters, so the
    name is checked against a strict pattern instead)."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"invalid database name {name!r}")
    async with open_database(admin_dsn, min_size=1, max_size=1) as db:
        exists = await db.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await db.execute(f'CREATE DATABASE "{name}"')


def with_database(dsn: str, name: str) -> str:
    """``dsn`` with its database replaced by ``name`` (keeps host, socket and options)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


class EmbeddedPostgres:
    """A PostgreSQL server in a local directory through the ``pgserver`` wheel.

    Started on a Unix socket inside ``pgdata`` (no TCP port), stopped when the process that
    started it exits. Starting blocks for a few seconds, so it runs in a thread.
    """

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self._server: Any = None

    async def start(self) -> str:
        """Start (or attach to) the server; returns the DSN of its ``postgres`` database."""
        from pgserver import get_server  # type: ignore[attr-defined]  # heavy: embedded mode only

        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._server = await trio.to_thread.run_sync(get_server, self.pgdata)
        return str(self._server.get_uri("postgres"))

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
