"""The services' Prometheus metrics (prometheus-client) and what serves them on ``/metrics``.

Both services expose ``GET /metrics`` in Prometheus' text format (who may scrape it: docs/oma.md
and docs/vma.md, "Metrics"). What is measured, and where:

- ``mover_pass_bytes``, ``mover_pass_seconds`` (histograms by ``kind``): each completed pass of
  the OMA's engines, bytes sent as data and duration from claim to end;
  ``mover_bytes_moved_total{kind}`` the same bytes summed;
- ``mover_active_jobs{kind}`` (gauge): jobs the OMA's engines drive now;
- ``mover_job_results_total{kind,status}``: how each job they drove ended;
- ``mover_copy_bytes_total{how}`` (``data``, ``zero``), ``mover_copy_seconds``,
  ``mover_copy_throughput_bytes_per_second``, ``mover_active_copies``: the copies of
  :func:`pyapp.mover.copy` in this process;
- ``mover_api_request_duration_seconds{method,route,status}``: every API request, by route
  template (never the raw path);
- ``mover_db_pool_connections{state}`` (``size``, ``in_use``, ``max``): the database pools
  (:func:`pyapp.db.report_pool_metrics`).

``kind`` is ``replication`` or ``backup``. In a replication the disks are copied by the VMA
(its ``mover_copy_*``), and the OMA counts the pass from the VMA's per-disk figures; a backup's
copy runs in the OMA. The core exposes no per-NBD-request timing, so there is no request latency
histogram: the copy's throughput stands for it.

Worker processes (``oma-api-server --workers N``): a scrape reaches one worker at random, so
the parent points every worker at one directory (``PROMETHEUS_MULTIPROC_DIR``, set before the
workers import this module) and ``/metrics`` reads all of it: counters and histograms add up
across the workers, gauges are the sum over the live ones (``livesum``; the parent marks a dead
worker's files as such). Without that variable each process serves its own registry.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from quart import Quart, Response, g, request

#: Where worker processes write their samples (prometheus-client's own variable).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# A ``*_created`` series per counter and histogram doubles the exposition for nothing a
# dashboard of this service uses.
disable_created_metrics()  # type: ignore[no-untyped-call]

MIB = 1 << 20
_BYTES_BUCKETS = tuple(float(MIB * 4**i) for i in range(11))  # 1 MiB .. 1 TiB
_PASS_SECONDS_BUCKETS = (
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    43200.0,
)
_THROUGHPUT_BUCKETS = tuple(float(MIB * 2**i) for i in range(13))  # 1 MiB/s .. 4 GiB/s
_API_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

PASS_BYTES = Histogram(
    "mover_pass_bytes", "Bytes sent as data by one completed pass", ["kind"], buckets=_BYTES_BUCKETS
)
PASS_SECONDS = Histogram(
    "mover_pass_seconds", "Duration of one completed pass", ["kind"], buckets=_PASS_SECONDS_BUCKETS
)
BYTES_MOVED = Counter("mover_bytes_moved", "Bytes sent as data by completed passes", ["kind"])
ACTIVE_JOBS = Gauge(
    "mover_active_jobs", "Jobs driven now by this service", ["kind"], multiprocess_mode="livesum"
)
JOB_RESULTS = Counter("mover_job_results", "Jobs driven to their end, by how they ended", ["kind", "status"])
COPY_BYTES = Counter("mover_copy_bytes", "Bytes written by the mover's copies, as data or as zeroes", ["how"])
COPY_SECONDS = Histogram("mover_copy_seconds", "Duration of one finished copy", buckets=_PASS_SECONDS_BUCKETS)
COPY_THROUGHPUT = Histogram(
    "mover_copy_throughput_bytes_per_second",
    "Throughput of one finished copy (bytes read per second)",
    buckets=_THROUGHPUT_BUCKETS,
)
ACTIVE_COPIES = Gauge("mover_active_copies", "Copies running now", multiprocess_mode="livesum")
API_LATENCY = Histogram(
    "mover_api_request_duration_seconds",
    "API requests by route template and status",
    ["method", "route", "status"],
    buckets=_API_BUCKETS,
)
DB_POOL = Gauge(
    "mover_db_pool_connections",
    "Database pool connections: open (size), in use, allowed (max)",
    ["state"],
    multiprocess_mode="livesum",
)

KINDS = ("replication", "backup")
# Known label values start at 0, so a scrape shows them (and rate() works) before the first event.
for _kind in KINDS:
    for _metric in (PASS_BYTES, PASS_SECONDS, BYTES_MOVED, ACTIVE_JOBS):
        _metric.labels(_kind)
for _how in ("data", "zero"):
    COPY_BYTES.labels(_how)


def pass_completed(kind: str, data_bytes: int, seconds: float) -> None:
    """A pass of ``kind`` completed, having sent ``data_bytes`` as data in ``seconds``."""
    PASS_BYTES.labels(kind).observe(data_bytes)
    PASS_SECONDS.labels(kind).observe(seconds)
    BYTES_MOVED.labels(kind).inc(data_bytes)


def job_ended(kind: str, status: str) -> None:
    JOB_RESULTS.labels(kind, status).inc()


def copy_finished(data_bytes: int, zero_bytes: int, read_bytes: int, seconds: float) -> None:
    COPY_BYTES.labels("data").inc(data_bytes)
    COPY_BYTES.labels("zero").inc(zero_bytes)
    COPY_SECONDS.observe(seconds)
    if seconds > 0:
        COPY_THROUGHPUT.observe(read_bytes / seconds)


class PoolGauge:
    """One pool's share of :data:`DB_POOL`: applied as differences, so that several pools of a
    process (and several processes) add up."""

    def __init__(self) -> None:
        self._last = {"size": 0, "in_use": 0, "max": 0}

    def update(self, size: int, idle: int, max_size: int) -> None:
        for state, value in (("size", size), ("in_use", size - idle), ("max", max_size)):
            DB_POOL.labels(state).inc(value - self._last[state])
            self._last[state] = value

    def close(self) -> None:
        self.update(0, 0, 0)


def mark_worker_dead(pid: int) -> None:
    """A worker process is gone: its live gauges no longer count (multiprocess mode only)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def prepare_multiprocess_dir(directory: Path) -> None:
    """Empty ``directory`` (samples of an earlier run would be counted again) and name it in
    the environment the worker processes inherit; before any worker starts."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)


def render() -> bytes:
    """The metrics of this process, or of every worker process in multiprocess mode."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def route_of(rule: str | None) -> str:
    """The ``route`` label: the URL rule's template (``/api/v1/replications/<job_id>``), so
    that the label's values stay few; ``unmatched`` for a path no route knows."""
    return rule if rule is not None else "unmatched"


def time_requests(app: Quart) -> None:
    """Observe every request of ``app`` in :data:`API_LATENCY`. Call it before the app registers
    its own ``before_request`` functions (authentication) so that a refused request is timed too."""

    @app.before_request
    async def _start_clock() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    async def _observe(response: Response) -> Response:
        started: float | None = g.get("metrics_started")
        if started is not None:
            rule = request.url_rule.rule if request.url_rule is not None else None
            API_LATENCY.labels(request.method, route_of(rule), str(response.status_code)).observe(
                time.perf_counter() - started
            )
        return response


def metrics_response() -> Response:
    return Response(render(), status=200, content_type=CONTENT_TYPE)
