"""``vma-api-server``: run the VMA API on hypercorn under trio.

    vma-api-server -port 8081                 # as in the seed's unit file
    vma-api-server --port 0 --config vma.json # a free port; the bound address is printed

On start it prints one JSON line on stdout: ``{"event": "listening", "url": "http://..."}``.
Logs are JSON lines on stderr (the journal, under systemd). SIGTERM/SIGINT stop it: running jobs
get a few seconds, then are cancelled and their snapshots removed.

A port already in use or an unreadable or invalid configuration ends it with one line on stderr
(``vma-api-server: ...``) and exit status 1, no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from pyapp.logs import setup_logging
from pyapp.service import Notifier, bind_sockets, failure_message
from vma.app import create_app
from vma.config import VmaConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vma-api-server", description="VMA control API server")
    p.add_argument("-port", "--port", type=int, default=None, help="TCP port (default 8081; 0: a free port)")
    p.add_argument("-host", "--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("-config", "--config", type=Path, default=None, help="JSON configuration file")
    p.add_argument("--log-level", default=None, help="debug, info, warning, error")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> VmaConfig:
    config = VmaConfig.load(args.config) if args.config is not None else VmaConfig()
    if args.port is not None:
        config.port = args.port
    if args.host is not None:
        config.host = args.host
    if args.log_level is not None:
        config.log_level = args.log_level
    return config


async def serve_vma(
    config: VmaConfig,
    *,
    handle_signals: bool = True,
    notifier: Notifier | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled or (``handle_signals``) SIGTERM/SIGINT; reports the bound URL through
    ``task_status``. A signal sends systemd ``STOPPING=1`` through ``notifier`` when given."""
    hc = HypercornConfig()
    hc.bind = [f"{config.host}:{config.port}"]
    hc.accesslog = None
    hc.errorlog = None
    sockets = bind_sockets(hc)  # a taken port: one clear error before anything starts
    stop = trio.Event()

    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                if notifier is not None:
                    notifier.stopping()
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        if handle_signals:
            nursery.start_soon(watch_signals)
        binds: list[str] = await nursery.start(
            lambda task_status: worker_serve(
                wrap_app(create_app(config), hc.wsgi_max_body_size, None),
                hc,
                sockets=sockets,
                shutdown_trigger=stop.wait,
                task_status=task_status,
            )
        )
        task_status.started(binds[0])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args)
    except (OSError, ValueError) as e:
        print(f"vma-api-server: bad configuration: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    try:
        setup_logging(config.log_level.upper())
    except ValueError as e:  # an unknown level name
        print(f"vma-api-server: bad configuration: log level: {e}", file=sys.stderr)
        return 1
    logging.getLogger("hypercorn.access").setLevel(logging.WARNING)

    notifier = Notifier()
    pinging = trio.CancelScope()

    async def serve(*, task_status: trio.TaskStatus[str]) -> None:
        try:
            await serve_vma(config, notifier=notifier, task_status=task_status)
        finally:
            pinging.cancel()  # alive until the graceful shutdown is over

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            url: str = await nursery.start(serve)
            print(json.dumps({"event": "listening", "url": url}), flush=True)
            notifier.ready(f"listening on {url}")  # the app started and the socket accepts
            with pinging:
                await notifier.watchdog()

    try:
        trio.run(run)
    except Exception as exc:  # ExceptionGroup too: one line, exit status 1 (see pyapp.service)
        logging.getLogger("vma.server").debug("start-up failed", exc_info=exc)
        print(f"vma-api-server: {failure_message(exc)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
