"""``oma-api-server``: run the OMA REST service on hypercorn (trio worker).

    oma-api-server [--host H] [--port N] [--data-dir DIR] [--vma-url URL] [--log-level L]
    oma-api-server --data-dir DIR --create-admin NAME     # one-time: password read from stdin

``--port 0`` binds a free port; the bound address is printed on stdout as
``OMA listening on http://HOST:PORT`` once the service is ready (after migrations).
"""

from __future__ import annotations

import argparse
import getpass
import logging
import signal
import sys
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from oma.app import EMBEDDED_DB_NAME, MIGRATIONS_DIR, create_app
from oma.config import OmaConfig
from oma.crypto import hash_password
from pyapp.config import ConfigError
from pyapp.db import (
    EmbeddedPostgres,
    apply_migrations,
    create_database,
    load_migrations,
    open_database,
    with_database,
)
from pyapp.logs import setup_logging

log = logging.getLogger("oma.server")


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


async def run_server(config: OmaConfig) -> None:
    recent = setup_logging(config.log_level.upper())
    app = create_app(config, recent_logs=recent)
    hc = HypercornConfig()
    hc.bind = [f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = 10
    hc.keep_alive_timeout = 75
    async with trio.open_nursery() as nursery:
        stop: trio.Event = await nursery.start(_shutdown_on_signal)
        binds: list[str] = await nursery.start(
            lambda task_status: serve(app, hc, shutdown_trigger=stop.wait, task_status=task_status)
        )
        for bind in binds:
            print(f"OMA listening on {bind}", flush=True)
        await stop.wait()
    # Every task is done: the signal receiver returned and serve() finished its graceful shutdown.


async def create_admin(config: OmaConfig, username: str, password: str) -> None:
    embedded = None
    dsn = config.database_url
    if dsn is None:
        embedded = EmbeddedPostgres(config.pgdata)
        admin_dsn = await embedded.start()
        await create_database(admin_dsn, EMBEDDED_DB_NAME)
        dsn = with_database(admin_dsn, EMBEDDED_DB_NAME)
    try:
        async with open_database(dsn, min_size=1, max_size=2) as db:
            await apply_migrations(db, load_migrations(MIGRATIONS_DIR))
            password_hash = await hash_password(password)
            created = await db.fetchval(
                "INSERT INTO users (username, password_hash, role) VALUES ($1, $2, 'admin')"
                " ON CONFLICT (username) DO NOTHING RETURNING id",
                username,
                password_hash,
            )
            if created is None:
                raise ConfigError(f"user {username!r} already exists")
    finally:
        if embedded is not None:
            await trio.to_thread.run_sync(embedded.stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = OmaConfig.from_env().with_overrides(
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            vma_url=args.vma_url,
            log_level=args.log_level,
        )
        if config.port > 65535:
            raise ConfigError(f"--port must be 0..65535, got {config.port}")
        if args.create_admin:
            setup_logging(config.log_level.upper())
            password = (
                getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
            )
            if len(password) < 8:
                raise ConfigError("the administrator password must have at least 8 characters")
            trio.run(create_admin, config, args.create_admin, password)
            print(f"administrator {args.create_admin!r} created")
            return 0
        trio.run(run_server, config)
    except ConfigError as exc:
        print(f"oma-api-server: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
