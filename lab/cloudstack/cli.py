"""``cloudstack-lab``: run the lab CloudStack management-server double.

    cloudstack-lab --port P --data-dir D --api-key K --secret-key S [--host H] [--device-root DIR]
                   [--oma-vm-mac MAC] [--oma-vm-ip IP] [--job-delay SECONDS] [--seed FILE]
    python -m lab.cloudstack ...        (the same)

Once it serves it prints one line, ``CloudStack lab listening on http://HOST:PORT/client/api``
(``--port 0`` takes a free port: read it from that line), and runs until SIGTERM or SIGINT.
A problem an operator can fix (the port is taken, the seed is invalid) ends it with one line on
stderr and status 1.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import sys
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from pyapp.logs import setup_logging
from pyapp.service import StartupError, bind_sockets, failure_message

from .app import LabSettings, create_app
from .cloud import Cloud, Options, mac_problem
from .seed import DEFAULT_SEED, SeedError, load_seed
from .signing import Credentials

log = logging.getLogger(__name__)

PROG = "cloudstack-lab"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="The lab CloudStack: a test double of CloudStack's management-server API"
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="listen port (0: any free port)")
    parser.add_argument("--data-dir", type=Path, required=True, help="state and volume files")
    parser.add_argument("--api-key", required=True, help="the API key of the double's one user")
    parser.add_argument("--secret-key", required=True, help="the secret key requests are signed with")
    parser.add_argument(
        "--device-root", type=Path, help="where the OMA guest's disk/by-id links go (default DATA_DIR/dev)"
    )
    parser.add_argument("--oma-vm-mac", help="the OMA VM's MAC address (default: the seed's)")
    parser.add_argument("--oma-vm-ip", help="the OMA VM's IP address (default: the seed's)")
    parser.add_argument(
        "--job-delay", type=float, default=0.3, help="seconds an async job stays pending (default 0.3)"
    )
    parser.add_argument("--seed", type=Path, default=DEFAULT_SEED, help="zones, offerings, networks (JSON)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if args.job_delay < 0:
        parser.error("--job-delay cannot be negative")
    return args


def settings_from(args: argparse.Namespace) -> tuple[LabSettings, str, int]:
    try:
        seed = load_seed(args.seed)
    except SeedError as exc:
        raise StartupError(str(exc)) from exc
    oma_network = next(n for n in seed.networks if n.id == seed.omavm.networkid)
    if args.oma_vm_mac is not None and (problem := mac_problem(args.oma_vm_mac)) is not None:
        raise StartupError(f"--oma-vm-mac: {problem}")
    if args.oma_vm_ip is not None and not _address_in(args.oma_vm_ip, oma_network.cidr):
        raise StartupError(
            f"--oma-vm-ip: {args.oma_vm_ip} is not a host address of the OMA VM's network"
            f" {oma_network.name} ({oma_network.cidr})"
        )
    data_dir: Path = args.data_dir.absolute()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create the data directory {data_dir}: {exc.strerror}") from exc
    options = Options(
        data_dir=data_dir,
        device_root=(args.device_root or data_dir / "dev").absolute(),
        oma_mac=args.oma_vm_mac,
        oma_ip=args.oma_vm_ip,
    )
    settings = LabSettings(seed, options, Credentials(args.api_key, args.secret_key), args.job_delay)
    return settings, args.host, args.port


def _address_in(address: str, cidr: str | None) -> bool:
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return False
    if cidr is None:
        return False
    network = ipaddress.IPv4Network(cidr)
    return ip in network and ip not in (network.network_address, network.broadcast_address)


def hypercorn_config(host: str, port: int) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = 5
    return hc


async def serve(
    settings: LabSettings,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    shutdown_trigger: trio.Event | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the double until ``shutdown_trigger`` is set (or the caller cancels); reports the
    API's URL once requests are answered. Every qemu the double started is stopped on the way
    out."""
    hc = hypercorn_config(host, port)
    sockets = bind_sockets(hc)
    lab_app = create_app(settings)
    cloud: Cloud = lab_app.extensions["lab_cloud"]
    app = wrap_app(lab_app, hc.wsgi_max_body_size, None)
    stop = shutdown_trigger if shutdown_trigger is not None else trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                partial(worker_serve, app, hc, sockets=sockets, shutdown_trigger=stop.wait)
            )
            task_status.started(f"{binds[0]}/client/api")
    finally:
        # Cancelled (a test's nursery), the app's after_serving may not run: the VMs' qemus are
        # stopped here either way.
        with trio.CancelScope(shield=True):
            await cloud.shutdown()


async def _run(settings: LabSettings, host: str, port: int) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:

        async def on_signal(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                task_status.started()
                async for _ in signals:
                    stop.set()
                    return

        await nursery.start(on_signal)
        url = await nursery.start(partial(serve, settings, host, port, shutdown_trigger=stop))
        print(f"CloudStack lab listening on {url}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level.upper())
    try:
        settings, host, port = settings_from(args)
        trio.run(_run, settings, host, port)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        print(f"{PROG}: {failure_message(exc)}", file=sys.stderr, flush=True)
        return 1
    return 0
