"""OMA API latency under load: p50/p99 of GET /vms, GET /replications and POST /replications.

    .venv/bin/python bench/oma_api.py [--clients 50] [--duration 20] [--vms 10000] [--jobs 10000]
                                      [--json results.json]

What it does, all on loopback:

1. a PostgreSQL: ``DATABASE_URL`` when set (a superuser DSN; a fresh ``oma_bench_*`` database is
   created on it), else an embedded one (pgserver) in a temporary directory;
2. the OMA as its own process (``python -m oma.server --port 0``), so the load generator never
   competes with it for the GIL;
3. seeds 10,000 VMs through ``POST /vms/inventory`` (batches of 1,000) and 10,000 finished
   replication jobs (with their VM contexts and disks) by SQL, then ``ANALYZE``;
4. for each endpoint in turn, ``--clients`` concurrent keep-alive HTTP/1.1 connections issue
   requests back to back for ``--duration`` seconds; every request's latency is recorded (from
   the first byte sent to the last byte of the answer). Lists are fetched with the default page
   (100 items); each POST creates a job for a new VM disk, so none answers 409.

The client is a minimal HTTP/1.1 keep-alive client on trio sockets (request bytes pre-built,
answers parsed by Content-Length) to keep its own CPU cost far below the server's: with httpx the
client would dominate on a 2-core machine. Non-2xx answers are counted as errors and reported.

Goal: p99 < 100 ms for each endpoint.

``--rss``: instead of the latency scenarios, the memory check (issue 13, item 10). After seeding,
``--clients`` clients run a mixed load (GET /vms, GET /replications, POST /replications, GET
/debug/logs in turn) for ``--warmup`` seconds, then for ``--duration`` seconds more, while the
OMA process's RSS (``VmRSS`` of ``/proc/<pid>/status``) is sampled every second. Reported: the RSS
after the warm-up, at the end, the peak, and end ÷ warm-up (goal ≤ 1.5).
``OMA_TRACEMALLOC_DIR`` (a debugging aid): the OMA is started under ``tracemalloc`` and writes a
snapshot there when it gets SIGUSR2; ``--rss`` sends it after the warm-up and at the end, and
prints the top differences.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pyapp.db import create_database, open_database, with_database  # noqa: E402

ADMIN_USER = "bench"
ADMIN_PASSWORD = "bench-password-not-secret"


@dataclass
class Result:
    name: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    #: Connections the server closed under a client (after a ``Connection: close`` answer, or a
    #: keep-alive timeout): the request counts as an error and the client dials again.
    reconnects: int = 0
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        n = len(lat)

        def pct(p: float) -> float:
            return round(lat[min(n - 1, int(p / 100 * n))], 2) if n else float("nan")

        return {
            "endpoint": self.name,
            "requests": n,
            "errors": self.errors,
            "reconnects": self.reconnects,
            "throughput_rps": round(n / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "p50_ms": pct(50),
            "p90_ms": pct(90),
            "p99_ms": pct(99),
            "max_ms": round(lat[-1], 2) if n else float("nan"),
            "mean_ms": round(statistics.fmean(lat), 2) if n else float("nan"),
        }


class KeepAliveClient:
    """One HTTP/1.1 keep-alive connection; requests are pre-rendered bytes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def request(self, raw: bytes) -> int:
        await self.stream.send_all(raw)
        while b"\r\n\r\n" not in self.buffer:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buffer += chunk
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            rest += chunk
        self.buffer = rest[length:]
        return status


def render(method: str, path: str, host: str, token: str, body: dict[str, Any] | None = None) -> bytes:
    payload = b"" if body is None else json.dumps(body).encode()
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: {len(payload)}\r\n"
        + ("Content-Type: application/json\r\n" if body is not None else "")
        + "\r\n"
    )
    return head.encode() + payload


async def run_load(
    name: str, host: str, port: int, clients: int, duration: float, make_request: Callable[[int, int], bytes]
) -> Result:
    result = Result(name)
    deadline = trio.current_time() + duration

    async def worker(index: int) -> None:
        i = 0
        while trio.current_time() < deadline:
            stream = await trio.open_tcp_stream(host, port)
            client = KeepAliveClient(stream)
            async with stream:
                try:
                    while trio.current_time() < deadline:
                        raw = make_request(index, i)
                        started = time.perf_counter()
                        status = await client.request(raw)
                        result.latencies_ms.append((time.perf_counter() - started) * 1000)
                        if status >= 300:
                            result.errors += 1
                        i += 1
                except (ConnectionError, trio.BrokenResourceError):
                    # the server closed this connection (as HTTP/1.1 lets it): dial again
                    result.errors += 1
                    result.reconnects += 1
                    i += 1

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(clients):
            nursery.start_soon(worker, index)
    result.elapsed_s = time.perf_counter() - started
    return result


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid`` (KiB), from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class RssRun:
    warmup_kib: int = 0
    end_kib: int = 0
    peak_kib: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, KiB)
    requests: int = 0
    errors: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "warmup_rss_mib": round(self.warmup_kib / 1024, 1),
            "end_rss_mib": round(self.end_kib / 1024, 1),
            "peak_rss_mib": round(self.peak_kib / 1024, 1),
            "ratio": round(self.end_kib / self.warmup_kib, 3),
            "requests": self.requests,
            "errors": self.errors,
            "samples": [(round(t, 1), round(k / 1024, 1)) for t, k in self.samples],
        }


def snapshot_files(directory: Path) -> set[Path]:
    return set(directory.glob("*.snap"))


async def tracemalloc_snapshot(pid: int, directory: Path, name: str) -> Path:
    """Ask the OMA (started with ``OMA_TRACEMALLOC_DIR``) for a snapshot; wait for the file."""
    import signal

    before = snapshot_files(directory)
    os.kill(pid, signal.SIGUSR2)
    with trio.fail_after(120):
        while True:
            new = snapshot_files(directory) - before
            if new:
                await trio.sleep(2)  # let it finish writing
                path = new.pop()
                return path.rename(directory / f"{name}.snap")
            await trio.sleep(0.5)


def print_tracemalloc_diff(first: Path, second: Path, top: int = 25) -> None:
    import tracemalloc

    old = tracemalloc.Snapshot.load(str(first))
    new = tracemalloc.Snapshot.load(str(second))
    for stat in new.compare_to(old, "traceback")[:top]:
        print(f"{stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks", file=sys.stderr)
        for line in stat.traceback.format()[-12:]:
            print(f"      {line}", file=sys.stderr)


async def run_rss(
    pid: int,
    host: str,
    port: int,
    clients: int,
    warmup: float,
    duration: float,
    make_request: Callable[[int, int], bytes],
    snapshots: Path | None,
) -> RssRun:
    """Mixed load for ``warmup`` then ``duration`` seconds, sampling the OMA's RSS every second."""
    run = RssRun()
    started = trio.current_time()

    async def sample() -> None:
        while True:
            kib = rss_kib(pid)
            run.samples.append((trio.current_time() - started, kib))
            run.peak_kib = max(run.peak_kib, kib)
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        first = await run_load("warm-up", host, port, clients, warmup, make_request)
        await trio.sleep(1)  # the last answers' garbage is collected
        run.warmup_kib = rss_kib(pid)
        print(f"RSS after the {warmup:.0f} s warm-up: {run.warmup_kib / 1024:.1f} MiB", file=sys.stderr)
        if snapshots is not None:
            await tracemalloc_snapshot(pid, snapshots, "warmup")
        second = await run_load("measured", host, port, clients, duration, make_request)
        await trio.sleep(1)
        run.end_kib = rss_kib(pid)
        if snapshots is not None:
            await tracemalloc_snapshot(pid, snapshots, "end")
        nursery.cancel_scope.cancel()
    run.requests = len(first.latencies_ms) + len(second.latencies_ms)
    run.errors = first.errors + second.errors
    if snapshots is not None:
        print_tracemalloc_diff(snapshots / "warmup.snap", snapshots / "end.snap")
    return run


async def seed(base: str, token: str, dsn: str, vms: int, jobs: int) -> None:
    import httpx

    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, timeout=120, headers=auth) as client:
        for start in range(0, vms, 1000):
            batch = [
                {
                    "id": f"vm-{i}",
                    "name": f"seed-vm-{i:05d}",
                    "path": f"/BenchDC/vm/seed-vm-{i:05d}",
                    "power_state": "poweredOn",
                    "guest_os": "debian12_64Guest",
                    "memory_mb": 4096,
                    "num_cpu": 2,
                    "disks": [{"id": "disk-2000", "capacity_bytes": 64 << 30}],
                }
                for i in range(start, min(vms, start + 1000))
            ]
            body = {"vcenter": {"host": "vc", "datacenter": "BenchDC"}, "vms": batch}
            r = await client.post("/api/v1/vms/inventory", json=body)
            r.raise_for_status()
    async with open_database(dsn, min_size=1, max_size=1) as db:
        await db.execute(
            "INSERT INTO vm_contexts (context_id, vm_name, vmware_vm_id, vm_path, current_status)"
            " SELECT 'ctx-seed-' || g, 'seed-vm-' || lpad(g::text, 5, '0'), 'vm-' || g,"
            " '/BenchDC/vm/seed-vm-' || lpad(g::text, 5, '0'), 'replicated'"
            " FROM generate_series(0, $1 - 1) g",
            jobs,
        )
        await db.execute(
            "INSERT INTO replication_jobs (id, vm_context_id, vm_id, vm_name, vm_path, replication_type,"
            " status, progress_percent, bytes_transferred, total_bytes, current_operation, created_by,"
            " created_at, completed_at)"
            " SELECT 'repl-seed-' || g, 'ctx-seed-' || g, 'vm-' || g,"
            " 'seed-vm-' || lpad(g::text, 5, '0'), '/BenchDC/vm/seed-vm-' || lpad(g::text, 5, '0'),"
            " 'initial', 'completed', 100, 64::bigint << 30,"
            " 64::bigint << 30, 'done', 'bench', now() - (g || ' seconds')::interval, now()"
            " FROM generate_series(0, $1 - 1) g",
            jobs,
        )
        await db.execute(
            "INSERT INTO replication_job_disks (job_id, disk_id, vm_path, capacity_bytes, active)"
            " SELECT 'repl-seed-' || g, 'disk-2000', '/BenchDC/vm/seed-vm-' || lpad(g::text, 5, '0'),"
            " 64::bigint << 30, false FROM generate_series(0, $1 - 1) g",
            jobs,
        )
        await db.execute("ANALYZE")


PEER_NAME = "peer: bare quart-trio GET"


def peer_page() -> dict[str, Any]:
    """A page shaped like ``GET /vms``'s (100 VMs), for the peer."""
    vms = [
        {
            "id": f"vm-{i}",
            "name": f"seed-vm-{i:05d}",
            "path": f"/BenchDC/vm/seed-vm-{i:05d}",
            "vcenter_host": "vc",
            "datacenter": "BenchDC",
            "power_state": "poweredOn",
            "guest_os": "debian12_64Guest",
            "memory_mb": 4096,
            "num_cpu": 2,
            "disks": [{"id": "disk-2000", "capacity_bytes": 64 << 30}],
            "networks": [],
            "source": "inventory",
            "first_seen_at": "2026-01-01T00:00:00.000Z",
            "updated_at": "2026-01-01T00:00:00.000Z",
        }
        for i in range(100)
    ]
    return {"vms": vms, "total": 10_000, "limit": 100, "offset": 0, "count": 100}


async def serve_peer() -> None:
    """The peer: the same stack (hypercorn, quart-trio) with one route, no database, no auth."""
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve
    from quart import Response
    from quart_trio import QuartTrio

    app = QuartTrio("peer")
    page = peer_page()

    @app.get("/peer")
    async def peer() -> Response:
        return Response(json.dumps(page, separators=(",", ":")), content_type="application/json")

    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, app, config)
        print(f"PEER listening on {binds[0]}", flush=True)


async def measure_peer(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--serve-peer"]
    peer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # noqa: ASYNC220
    try:
        assert peer.stdout is not None
        line = await trio.to_thread.run_sync(peer.stdout.readline)
        host, port = line.split()[-1].removeprefix("http://").split(":")
        raw = render("GET", "/peer", f"{host}:{port}", "none")
        print(f"{PEER_NAME}: {args.clients} clients for {args.duration}s ...", file=sys.stderr)
        result = await run_load(PEER_NAME, host, int(port), args.clients, args.duration, lambda c, i: raw)
        return result.summary()
    finally:
        peer.terminate()
        await trio.to_thread.run_sync(peer.wait)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="oma-bench-"))
    embedded = None
    try:
        admin_dsn = os.environ.get("DATABASE_URL")
        if not admin_dsn:
            from pgserver import get_server  # type: ignore[attr-defined]

            embedded = await trio.to_thread.run_sync(get_server, tmp / "pgdata")
            admin_dsn = str(embedded.get_uri("postgres"))
        name = f"oma_bench_{uuid.uuid4().hex[:10]}"
        await create_database(admin_dsn, name)
        dsn = with_database(admin_dsn, name)

        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "OMA_ADMIN_USERNAME": ADMIN_USER,
            "OMA_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "OMA_LOG_LEVEL": "warning",
            "OMA_WORKERS": str(args.workers),
            "PYTHONPATH": str(REPO),
        }
        if args.pool_size:
            env["OMA_DB_POOL_SIZE"] = str(args.pool_size)
        profile = ["-m", "cProfile", "-o", str(args.profile)] if args.profile else []
        snapshots = Path(env["OMA_TRACEMALLOC_DIR"]) if env.get("OMA_TRACEMALLOC_DIR") else None
        if snapshots is not None:
            snapshots.mkdir(parents=True, exist_ok=True)
            profile = ["-X", "tracemalloc=25", str(Path(__file__).with_name("tracemalloc_run.py"))]
        cmd = [
            sys.executable,
            *profile,
            *([] if snapshots is not None else ["-m", "oma.server"]),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--data-dir",
            str(tmp / "oma"),
        ]
        # the OMA runs for the whole benchmark: a child process, not a blocking call
        server = subprocess.Popen(  # noqa: ASYNC220
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        try:
            assert server.stdout is not None
            line = await trio.to_thread.run_sync(server.stdout.readline)
            if not line.startswith("OMA listening on "):
                raise SystemExit(f"the OMA did not start: {line!r}")
            base = line.split()[-1]
            host, port = base.removeprefix("http://").split(":")
            import httpx

            async with httpx.AsyncClient(base_url=base) as client:
                login = {"username": ADMIN_USER, "password": ADMIN_PASSWORD}
                r = await client.post("/api/v1/auth/login", json=login)
                token = r.json()["token"]
            print(f"seeding {args.vms} VMs and {args.jobs} replications ...", file=sys.stderr)
            await seed(base, token, dsn, args.vms, args.jobs)
            hostport = f"{host}:{port}"
            get_vms = render("GET", "/api/v1/vms", hostport, token)
            get_jobs = render("GET", "/api/v1/replications", hostport, token)
            run_id = uuid.uuid4().hex[:6]

            def post_job(client: int, i: int) -> bytes:
                vm = f"load-{run_id}-{client}-{i}"
                body = {
                    "source_vm": {
                        "name": vm,
                        "path": f"/BenchDC/vm/{vm}",
                        "disks": [{"id": "disk-2000", "capacity_bytes": 1 << 30}],
                    }
                }
                return render("POST", "/api/v1/replications", hostport, token, body)

            if args.rss:
                get_logs = render("GET", "/api/v1/debug/logs", hostport, token)
                kinds: dict[str, Callable[[int, int], bytes]] = {
                    "vms": lambda c, i: get_vms,
                    "jobs": lambda c, i: get_jobs,
                    "post": post_job,
                    "logs": lambda c, i: get_logs,
                }
                mixed = [kinds[k] for k in args.mix.split(",")]
                print(
                    f"RSS: {args.clients} clients, mixed load, {args.warmup}s warm-up + {args.duration}s ...",
                    file=sys.stderr,
                )
                run = await run_rss(
                    server.pid,
                    host,
                    int(port),
                    args.clients,
                    args.warmup,
                    args.duration,
                    lambda c, i: mixed[(c + i) % len(mixed)](c, i),
                    snapshots,
                )
                return [run.summary()]
            scenarios: list[tuple[str, Callable[[int, int], bytes]]] = [
                ("GET /api/v1/vms", lambda c, i: get_vms),
                ("GET /api/v1/replications", lambda c, i: get_jobs),
                ("POST /api/v1/replications", post_job),
            ]
            summaries = []
            for name_, make in scenarios:
                print(f"{name_}: {args.clients} clients for {args.duration}s ...", file=sys.stderr)
                result = await run_load(name_, host, int(port), args.clients, args.duration, make)
                summaries.append(result.summary())
        finally:
            server.terminate()
            await trio.to_thread.run_sync(server.wait)
        if not args.no_peer:
            summaries.append(await measure_peer(args))
        return summaries
    finally:
        if embedded is not None:
            embedded.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--vms", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--pool-size", type=int, help="database pool size per OMA worker")
    parser.add_argument(
        "--workers", type=int, default=1, help="OMA worker processes (oma-api-server --workers)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--profile", type=Path, help="run the OMA under cProfile, writing the stats here")
    parser.add_argument("--no-peer", action="store_true", help="skip the bare quart-trio peer measurement")
    parser.add_argument("--serve-peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--rss", action="store_true", help="measure the OMA's RSS under a mixed load instead of latencies"
    )
    parser.add_argument(
        "--warmup", type=float, default=60.0, help="--rss: warm-up seconds before the baseline"
    )
    parser.add_argument(
        "--mix", default="vms,jobs,post,logs", help="--rss: the requests each client cycles through"
    )
    args = parser.parse_args()
    if args.serve_peer:
        trio.run(serve_peer)
        return
    if args.rss:
        load_before = os.getloadavg()[0]
        (rss,) = trio.run(main_async, args)
        samples = rss.pop("samples")
        rss["load_average_before_after"] = [load_before, os.getloadavg()[0]]
        print(
            f"OMA RSS: after warm-up {rss['warmup_rss_mib']} MiB, at the end {rss['end_rss_mib']} MiB,"
            f" peak {rss['peak_rss_mib']} MiB, end/warm-up {rss['ratio']} (goal <= 1.5:"
            f" {'met' if rss['ratio'] <= 1.5 else 'NOT met'}); {rss['requests']} requests,"
            f" {rss['errors']} errors; {args.clients} clients, {args.warmup:.0f} s + {args.duration:.0f} s;"
            f" load average before/after {load_before:.1f}/{os.getloadavg()[0]:.1f}"
        )
        if args.json:
            report = {**vars(args), "json": str(args.json), **rss, "samples": samples}
            args.json.write_text(json.dumps(report))
        return
    load_before = os.getloadavg()[0]
    summaries = trio.run(main_async, args)
    print(
        f"{'endpoint':<28} {'req':>7} {'err':>4} {'req/s':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}"
        f" {'max ms':>8}"
    )
    for s in summaries:
        print(
            f"{s['endpoint']:<28} {s['requests']:>7} {s['errors']:>4} {s['throughput_rps']:>7} "
            f"{s['p50_ms']:>8} {s['p90_ms']:>8} {s['p99_ms']:>8} {s['max_ms']:>8}"
        )
    oma = [s for s in summaries if s["endpoint"] != PEER_NAME]
    peer = next((s for s in summaries if s["endpoint"] == PEER_NAME), None)
    if peer:
        for s in oma:
            s["p50_vs_peer"] = round(s["p50_ms"] / peer["p50_ms"], 2)
            s["p99_vs_peer"] = round(s["p99_ms"] / peer["p99_ms"], 2)
            print(f"{s['endpoint']:<28} p50 x{s['p50_vs_peer']} p99 x{s['p99_vs_peer']} of the peer")
    goal = all(s["p99_ms"] < 100 for s in oma)
    print(
        f"goal p99 < 100 ms: {'met' if goal else 'NOT met'}  (OMA workers: {args.workers},"
        f" cpus: {os.cpu_count()}, load average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f})"
    )
    if args.json:
        report = {
            "clients": args.clients,
            "duration_s": args.duration,
            "workers": args.workers,
            "vms": args.vms,
            "jobs": args.jobs,
            "load_average_before_after": [load_before, os.getloadavg()[0]],
            "results": summaries,
        }
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
