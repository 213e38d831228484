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

A lost connection (PostgreSQL restarted, killed, or not answering new connections yet) is retried
with exponential backoff and jitter (tenacity) for up to ``retry_deadline`` seconds, by every
statement of :class:`Database` and by the acquisition of a connection for a transaction — never by
replaying a transaction whose connection broke in the middle: that error reaches its caller. The
statements sent outside a transaction are single, idempotent updates or reads, so running one a
second time after a reply was lost does no harm.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar, cast

import asyncpg  # type: ignore[import-untyped]
import tenacity
import trio
import trio_asyncio  # type: ignore[import-untyped]

from pyapp import metrics

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

#: How long a statement retries a lost connection by default (seconds).
RETRY_DEADLINE_S = 120.0


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the server is gone or not accepting connections (yet): worth
    retrying on a new connection, as opposed to an error of the statement itself."""
    return isinstance(
        exc,
        asyncpg.PostgresConnectionError  # class 08: lost, refused, cannot establish
        | asyncpg.CannotConnectNowError  # starting up, shutting down, in recovery
        | asyncpg.AdminShutdownError
        | asyncpg.CrashShutdownError
        | asyncpg.TooManyConnectionsError
        | ConnectionError  # refused, reset
        | FileNotFoundError,  # the Unix socket is not there (the server is restarting)
    ) or (isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc))


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    log.warning(
        "database connection lost (%s): retrying in %.1f s",
        exc,
        state.next_action.sleep if state.next_action is not None else 0.0,
        extra={"action": "db_retry", "attempt": state.attempt_number},
    )


# One advisory lock key for "migrations of this database" (any constant 64-bit value works).
MIGRATION_LOCK_KEY = 0x6F6D615F6D696772  # "oma_migr"
_MIGRATION_NAME = re.compile(r"^(\d{3,})_[A-Za-z0-9_]+\.sql$")


def _drop_cancelled_timers(loop: Any) -> None:
    """Make ``loop`` (trio-asyncio) forget cancelled timers, as asyncio's own loop does.

    trio-asyncio keeps a cancelled ``TimerHandle`` in its heap until the handle's deadline, and a
    handle holds the context it was created in (a request's, with its request and response).
    asyncpg schedules a timer on every query (``command_timeout``) and every pool release (the
    idle-connection timer, 300 s) and cancels it soon after: under load the OMA kept hundreds of
    MB of finished requests alive. Once more than half of the heap is cancelled it is rebuilt.
    """
    cancelled = 0

    def timer_handle_cancelled(handle: Any) -> None:
        nonlocal cancelled
        cancelled += 1
        timers: list[Any] = loop._timers
        if cancelled > 100 and cancelled * 2 > len(timers):
            timers[:] = [t for t in timers if not t.cancelled()]
            heapq.heapify(timers)
            cancelled = 0

    loop._timer_handle_cancelled = timer_handle_cancelled


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

    def __init__(self, bridge: _Bridge, pool: asyncpg.Pool, retry_deadline: float = RETRY_DEADLINE_S) -> None:
        self._bridge = bridge
        self._pool = pool
        self.retry_deadline = retry_deadline

    def _retrying(self) -> tenacity.AsyncRetrying:
        return tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(connection_lost),
            wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=5.0),
            stop=tenacity.stop_after_delay(self.retry_deadline),
            sleep=trio.sleep,
            before_sleep=_log_retry,
            reraise=True,
        )

    async def _retry(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await fn(*args)`` (a trio coroutine function), retried while the connection is lost."""
        async for attempt in self._retrying():
            with attempt:
                return await fn(*args)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """An asyncpg call (asyncio) through the bridge, retried while the connection is lost."""
        return await self._retry(self._bridge.run, fn, *args)

    async def execute(self, sql: str, *args: Any) -> str:
        return cast(str, await self._run(self._pool.execute, sql, *args))

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        await self._run(self._pool.executemany, sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[Record]:
        return cast(list[Record], await self._run(self._pool.fetch, sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Record | None:
        return cast(Record | None, await self._run(self._pool.fetchrow, sql, *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._run(self._pool.fetchval, sql, *args)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        conn = await self._run(self._pool.acquire)
        try:
            yield Connection(self._bridge, conn)
        finally:
            with trio.CancelScope(shield=True):
                await self._bridge.run(self._pool.release, conn)

    async def _begin(self, isolation: str) -> tuple[Any, Any]:
        """A pooled connection with a transaction started on it. A connection broken by a server
        restart fails at ``BEGIN``, before anything ran: it is released and another one taken."""
        conn = await self._bridge.run(self._pool.acquire)
        try:
            tx = conn.transaction(isolation=isolation)
            await self._bridge.run(tx.start)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._bridge.run(self._pool.release, conn)
            raise
        return conn, tx

    @contextlib.asynccontextmanager
    async def transaction(self, isolation: str = "read_committed") -> AsyncIterator[Connection]:
        """A connection inside a transaction: committed on normal exit, rolled back on error."""
        conn, tx = await self._retry(self._begin, isolation)
        try:
            try:
                yield Connection(self._bridge, conn)
            except BaseException:
                with trio.CancelScope(shield=True):
                    try:
                        await self._bridge.run(tx.rollback)
                    except Exception as e:
                        if not connection_lost(e):
                            raise
                        # the server rolled it back already: the caller gets its own error
                raise
            else:
                await self._bridge.run(tx.commit)
        finally:
            with trio.CancelScope(shield=True):
                await self._bridge.run(self._pool.release, conn)

    def pool_stats(self) -> dict[str, int]:
        return {
            "size": self._pool.get_size(),
            "idle": self._pool.get_idle_size(),
            "min_size": self._pool.get_min_size(),
            "max_size": self._pool.get_max_size(),
        }


@contextlib.asynccontextmanager
async def open_database(
    dsn: str, *, min_size: int = 2, max_size: int = 10, retry_deadline: float = RETRY_DEADLINE_S
) -> AsyncIterator[Database]:
    """Open a trio-asyncio loop and an asyncpg pool on ``dsn`` for the duration of the block.
    ``retry_deadline``: how long each statement retries a lost connection."""
    async with trio_asyncio.open_loop() as loop:
        _drop_cancelled_timers(loop)
        bridge = _Bridge(loop)
        pool = await bridge.run(
            asyncpg.create_pool, dsn, min_size=min_size, max_size=max_size, command_timeout=30
        )
        try:
            yield Database(bridge, pool, retry_deadline)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await bridge.run(pool.close)


async def report_pool_metrics(db: Database, stop: trio.Event, interval: float = 1.0) -> None:
    """Keep ``db``'s pool in the metrics (``mover_db_pool_connections``: open, in use, allowed),
    sampled every ``interval`` seconds until ``stop`` is set; a service runs it beside its work."""
    gauge = metrics.PoolGauge()
    try:
        while not stop.is_set():
            stats = db.pool_stats()
            gauge.update(stats["size"], stats["idle"], stats["max_size"])
            with trio.move_on_after(interval):
                await stop.wait()
    finally:
        gauge.close()


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


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class EmbeddedPostgres:
    """A PostgreSQL server in a local directory through the ``pgserver`` wheel.

    Started on a Unix socket inside ``pgdata`` (no TCP port), stopped by :meth:`stop` (and at
    the latest when the process exits) unless another live process still holds a handle on it.
    Starting blocks for a few seconds, so it runs in a thread.

    A server left running by a process killed with SIGKILL is reused, never doubled (PostgreSQL's
    ``postmaster.pid`` is checked first); the killed process's handle is dropped at that start so
    that the new owner's :meth:`stop` does stop the server.
    """

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self._server: Any = None

    async def start(self) -> str:
        """Start (or attach to) the server; returns the DSN of its ``postgres`` database."""
        from pgserver import get_server  # type: ignore[attr-defined]  # heavy: embedded mode only

        self.pgdata.mkdir(parents=True, exist_ok=True)
        await trio.to_thread.run_sync(self._forget_dead_handles)
        self._server = await trio.to_thread.run_sync(get_server, self.pgdata)
        return str(self._server.get_uri("postgres"))

    def _forget_dead_handles(self) -> None:
        """Drop from pgserver's list of handle holders (``.handle_pids.json``) the processes that
        are gone: a holder killed with SIGKILL never removed itself, and pgserver stops the server
        only when the last holder lets go — with a dead one listed, never."""
        import json

        from pgserver.postgres_server import PostgresServer

        handles = self.pgdata / ".handle_pids.json"
        with PostgresServer._lock:  # pgserver's own inter-process lock over that file
            try:
                pids = json.loads(handles.read_text())
            except (OSError, ValueError):
                return
            if not isinstance(pids, list):
                return
            alive = [p for p in pids if isinstance(p, int) and _process_exists(p)]
            if alive != pids:
                log.info(
                    "dropping handles of exited processes on the embedded PostgreSQL",
                    extra={"action": "db_start", "pids": sorted(set(pids) - set(alive))},
                )
                handles.write_text(json.dumps(alive))

    def running(self) -> bool:
        """Whether the server's postmaster runs (False after it was killed, or before start)."""
        from pgserver.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        return info is not None and bool(info.is_running())

    def ensure_running(self) -> bool:
        """Start the server again if it died (blocking; same socket, so the DSN holds). True if
        it had to be restarted. Raises when it cannot start (yet): the caller tries again."""
        if self._server is None or self.running():
            return False
        log.warning("embedded PostgreSQL is not running: restarting it", extra={"action": "db_restart"})
        self._server.ensure_postgres_running()
        log.info("embedded PostgreSQL restarted", extra={"action": "db_restart"})
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


async def watch_embedded(embedded: EmbeddedPostgres, stop: trio.Event, interval: float = 1.0) -> None:
    """Restart ``embedded`` whenever it dies, until ``stop`` is set (a task of the owning service)."""
    while True:
        with trio.move_on_after(interval):
            await stop.wait()
        if stop.is_set():
            return
        try:
            await trio.to_thread.run_sync(embedded.ensure_running)
        except Exception as e:  # e.g. the killed server's backends still hold its shared memory
            log.warning("embedded PostgreSQL did not start yet: %s", e, extra={"action": "db_restart"})
