"""``oma-api-server``: run the OMA REST service on hypercorn (trio worker).

    oma-api-server [--host H] [--port N] [--data-dir DIR] [--vma-url URL] [--log-level L] [--workers N]
    oma-api-server --data-dir DIR --create-admin NAME     # one-time: password read from stdin

``--port 0`` binds a free port; the bound address is printed on stdout as
``OMA listening on http://HOST:PORT`` once the service is ready (after migrations).

``--workers N`` (N > 1) runs N worker processes accepting on one listening socket opened by this
(parent) process; the parent starts the embedded PostgreSQL when no ``DATABASE_URL`` is set and
hands its address to the workers, creates the key file, prints the address once every worker is
serving, and on SIGTERM/SIGINT tells them to shut down gracefully. Workers share nothing but the
database (tokens, revocations and jobs all live there), which is what makes this safe.

A worker that dies (killed, crashed) is replaced by a new one; the others and the database keep
running. The new worker takes over the dead one's jobs at its start (their claimant is gone),
and any live worker would once their leases expire. More than :data:`MAX_RESTARTS` deaths within
:data:`RESTART_WINDOW_S` seconds mean something is wrong with every worker: the parent stops.
The parent also restarts the embedded PostgreSQL if it dies.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from functools import partial
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import repr_socket_addr, wrap_app

from oma.app import EMBEDDED_DB_NAME, create_app
from oma.config import OmaConfig
from oma.crypto import hash_password, load_or_create_key
from oma.store import MIGRATIONS_DIR
from pyapp.config import ConfigError
from pyapp.db import (
    EmbeddedPostgres,
    apply_migrations,
    create_database,
    load_migrations,
    open_database,
    with_database,
)
from pyapp.logs import redact_text, setup_logging
from pyapp.metrics import mark_worker_dead, prepare_multiprocess_dir
from pyapp.service import Notifier, StartupError, bind_sockets, failure_message

log = logging.getLogger("oma.server")

#: Worker deaths tolerated within :data:`RESTART_WINDOW_S` before the parent gives up.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="oma-api-server", description="OMA REST API server")
    parser.add_argument("--host", help="listen address (default 0.0.0.0, env OMA_HOST)")
    parser.add_argument(
        "--port", type=int, help="listen port (default 8082, 0 = any free port, env OMA_PORT)"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="data directory (default /var/lib/oma, env OMA_DATA_DIR)"
    )
    parser.add_argument("--vma-url", help="VMA API base URL (default http://localhost:9081, env OMA_VMA_URL)")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="env OMA_LOG_LEVEL"
    )
    parser.add_argument(
        "--workers", type=int, help="worker processes sharing the port (default 1, env OMA_WORKERS)"
    )
    parser.add_argument(
        "--create-admin",
        metavar="USERNAME",
        help="create an administrator (password read from stdin, or prompted on a terminal) and exit",
    )
    return parser.parse_args(argv)


async def _shutdown_on_signal(task_status: trio.TaskStatus[trio.Event] = trio.TASK_STATUS_IGNORED) -> None:
    done = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started(done)
        async for signum in signals:
            log.info(
                "signal %s received, shutting down", signal.Signals(signum).name, extra={"action": "shutdown"}
            )
            done.set()
            return


def hypercorn_config(config: OmaConfig) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = 10
    hc.keep_alive_timeout = 75
    hc.backlog = 1024
    return hc


@contextlib.asynccontextmanager
async def database_for(config: OmaConfig) -> AsyncIterator[tuple[OmaConfig, EmbeddedPostgres | None]]:
    """``config`` with its database, for the one-shot commands (``--create-admin``):
    ``DATABASE_URL``, or the embedded PostgreSQL of the data directory started here (reused if a
    killed OMA left it running) and stopped when the block ends, however it ends."""
    if config.database_url is not None:
        yield config, None
        return
    embedded = EmbeddedPostgres(config.pgdata)
    try:
        try:
            admin_dsn = await embedded.start()
            await create_database(admin_dsn, EMBEDDED_DB_NAME)
        except Exception as exc:  # pg_ctl failed, the directory is not writable, ...
            raise StartupError(
                f"cannot start the embedded PostgreSQL in {config.pgdata}: {failure_message(exc)}"
                f" (its log: {config.pgdata / 'log'})"
            ) from exc
        log.info("embedded PostgreSQL running", extra={"action": "startup", "pgdata": str(config.pgdata)})
        yield config.with_overrides(database_url=with_database(admin_dsn, EMBEDDED_DB_NAME)), embedded
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(embedded.stop)


async def check_database(dsn: str) -> None:
    """Fail at once, with one line, when the database refuses the connection (or the login): an
    OMA that cannot reach its database at start-up is misconfigured, not having a bad moment."""
    try:
        async with open_database(dsn, min_size=1, max_size=1, retry_deadline=0) as db:
            await db.fetchval("SELECT 1")
    except Exception as exc:
        where = redact_text(dsn)
        raise StartupError(f"cannot connect to the database {where}: {failure_message(exc)}") from exc


async def run_server(config: OmaConfig) -> None:
    """Serve until SIGTERM/SIGINT. The port is bound, and a configured ``DATABASE_URL`` reached,
    before the application starts, so that either failing is one clear error. The application
    starts and stops the embedded PostgreSQL (see :mod:`oma.app`)."""
    recent = setup_logging(config.log_level.upper())
    hc = hypercorn_config(config)
    sockets = bind_sockets(hc)
    notifier = Notifier()
    pinging = trio.CancelScope()

    async def serve(app: Any, *, task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await worker_serve(app, hc, sockets=sockets, shutdown_trigger=stop.wait, task_status=task_status)
        finally:
            pinging.cancel()  # alive until the graceful shutdown is over

    async def ping() -> None:
        with pinging:
            await notifier.watchdog()

    async with trio.open_nursery() as nursery:
        stop: trio.Event = await nursery.start(_shutdown_on_signal)
        if config.database_url is not None:
            await check_database(config.database_url)
        app = wrap_app(create_app(config, recent_logs=recent), hc.wsgi_max_body_size, None)
        binds: list[str] = await nursery.start(serve, app)
        for bind in binds:
            print(f"OMA listening on {bind}", flush=True)
        # worker_serve reports only once the app's start-up (database, migrations) is done and
        # the sockets accept: what READY=1 means for systemd (a Type=notify unit).
        notifier.ready(f"listening on {', '.join(binds)}")
        nursery.start_soon(ping)
        await stop.wait()
        notifier.stopping()
    # Every task is done: the signal receiver returned and serve() finished its graceful shutdown.


def _worker_process(config: OmaConfig, sockets: Sockets, shutdown: MpEvent, ready: Any) -> None:
    # The parent owns signal handling and tells the workers to stop through ``shutdown``.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    trio.run(_worker_main, config, sockets, shutdown, ready)


async def _worker_main(config: OmaConfig, sockets: Sockets, shutdown: MpEvent, ready: Any) -> None:
    recent = setup_logging(config.log_level.upper())
    app = create_app(config, recent_logs=recent)
    hc = hypercorn_config(config)
    parent = os.getppid()

    async def shutdown_requested() -> None:
        # a multiprocessing Event cannot wake trio: poll it (as hypercorn's own workers do)
        # ... and stop when the parent is gone (killed with SIGKILL: nothing told us)
        while not shutdown.is_set() and os.getppid() == parent:  # noqa: ASYNC110
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                worker_serve,
                wrap_app(app, hc.wsgi_max_body_size, None),
                hc,
                sockets=sockets,
                shutdown_trigger=shutdown_requested,
            )
        )
        ready.put(os.getpid())


def run_workers(config: OmaConfig) -> int:
    """Serve with ``config.workers`` processes on one listening socket (see the module doc)."""
    setup_logging(config.log_level.upper())
    hc = hypercorn_config(config)
    sockets = bind_sockets(hc)  # a taken port: one line, before anything started
    embedded: EmbeddedPostgres | None = None
    if config.database_url is None:
        embedded = EmbeddedPostgres(config.pgdata)

        async def start_embedded() -> str:
            assert embedded is not None
            try:
                admin_dsn = await embedded.start()
                await create_database(admin_dsn, EMBEDDED_DB_NAME)
            except Exception as exc:
                raise StartupError(
                    f"cannot start the embedded PostgreSQL in {config.pgdata}: {failure_message(exc)}"
                ) from exc
            return with_database(admin_dsn, EMBEDDED_DB_NAME)

        try:
            config = config.with_overrides(database_url=trio.run(start_embedded))
        except BaseException:
            embedded.stop()
            raise
    try:
        assert config.database_url is not None
        trio.run(check_database, config.database_url)  # refused: one line, not N dying workers
        load_or_create_key(config.key_file)  # once, before the workers race for it
        # every worker writes its samples there, so that /metrics on any worker reads them all
        prepare_multiprocess_dir(config.data_dir / "run" / "metrics")
        ctx = multiprocessing.get_context("spawn")
        shutdown = ctx.Event()
        ready = ctx.Queue()

        def new_worker() -> Any:
            return ctx.Process(target=_worker_process, args=(config, sockets, shutdown, ready), daemon=False)

        workers = [new_worker() for _ in range(config.workers)]
        stop_requested = False

        notifier = Notifier()

        def on_signal(signum: int, frame: object) -> None:
            nonlocal stop_requested
            if not stop_requested:
                notifier.stopping()
            stop_requested = True
            shutdown.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        for worker in workers:
            worker.start()
        try:
            started = 0
            deadline = time.monotonic() + 300
            while started < len(workers) and not stop_requested:
                if any(not w.is_alive() for w in workers):
                    log.error("a worker exited during start-up", extra={"action": "startup"})
                    return 1
                if time.monotonic() > deadline:
                    log.error("workers did not start within 300 s", extra={"action": "startup"})
                    return 1
                try:
                    ready.get(timeout=0.5)
                    started += 1
                except Exception:  # queue.Empty
                    continue
            for sock in sockets.insecure_sockets:
                print(
                    f"OMA listening on http://{repr_socket_addr(sock.family, sock.getsockname())}", flush=True
                )
            # every worker serves (its database is up, it accepts on the shared socket): ready
            notifier.ready(f"{len(workers)} workers listening")
            ping_every = notifier.watchdog_interval()
            last_ping = 0.0
            deaths: list[float] = []
            while not stop_requested:
                if ping_every is not None and time.monotonic() - last_ping >= ping_every:
                    notifier.notify("WATCHDOG=1")  # this supervising loop is alive
                    last_ping = time.monotonic()
                time.sleep(min(0.5, ping_every or 0.5))
                if embedded is not None and not stop_requested:
                    try:
                        embedded.ensure_running()
                    except Exception as e:
                        log.warning(
                            "embedded PostgreSQL did not start yet: %s", e, extra={"action": "db_restart"}
                        )
                for i, worker in enumerate(workers):
                    if worker.is_alive() or stop_requested:
                        continue
                    now = time.monotonic()
                    deaths = [t for t in deaths if now - t < RESTART_WINDOW_S] + [now]
                    if len(deaths) > MAX_RESTARTS:
                        log.error(
                            "%d worker deaths within %.0f s: stopping", len(deaths), RESTART_WINDOW_S,
                            extra={"action": "shutdown"},
                        )
                        return 1
                    log.error(
                        "worker %s exited (%s): starting another", worker.pid, worker.exitcode,
                        extra={"action": "worker_restart"},
                    )
                    worker.join(0)
                    if worker.pid is not None:
                        mark_worker_dead(worker.pid)  # its gauges no longer count
                    workers[i] = new_worker()
                    workers[i].start()
            return 0
        finally:
            shutdown.set()
            for worker in workers:
                worker.join(30)
                if worker.is_alive():
                    worker.kill()
                    worker.join()
    finally:
        if embedded is not None:
            embedded.stop()


async def create_admin(config: OmaConfig, username: str, password: str) -> None:
    """Create ``username`` as administrator; an existing user is an error (exit 1), as for
    ``useradd``: the command never changes an existing account's password or role."""
    async with database_for(config) as (config, _):
        assert config.database_url is not None
        await check_database(config.database_url)
        async with open_database(config.database_url, min_size=1, max_size=2) as db:
            await apply_migrations(db, load_migrations(MIGRATIONS_DIR))
            password_hash = await hash_password(password)
            created = await db.fetchval(
                "INSERT INTO users (username, password_hash, role) VALUES ($1, $2, 'admin')"
                " ON CONFLICT (username) DO NOTHING RETURNING id",
                username,
                password_hash,
            )
            if created is None:
                raise StartupError(f"user {username!r} already exists: nothing changed")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = OmaConfig.from_env().with_overrides(
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            vma_url=args.vma_url,
            log_level=args.log_level,
            workers=args.workers,
        )
        if config.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {config.workers}")
        if config.port > 65535:
            raise ConfigError(f"--port must be 0..65535, got {config.port}")
        if args.create_admin:
            # a one-shot command: quiet unless something is wrong (or --log-level says otherwise)
            setup_logging((args.log_level or "warning").upper())
            password = (
                getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
            )
            if args.create_admin.startswith("vma-"):
                raise ConfigError("user names starting with 'vma-' are reserved for enrolled VMAs")
            if len(password) < 8:
                raise ConfigError("the administrator password must have at least 8 characters")
            trio.run(create_admin, config, args.create_admin, password)
            print(f"administrator {args.create_admin!r} created")
            return 0
        if config.workers > 1:
            return run_workers(config)
        trio.run(run_server, config)
    except Exception as exc:  # ExceptionGroup too
        # One line, exit status 1: the port is taken, the configuration or the database is wrong.
        # The traceback, for a developer, only at debug level (a JSON line like every log).
        log.debug("start-up failed", exc_info=exc, extra={"action": "shutdown"})
        print(f"oma-api-server: {failure_message(exc)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
