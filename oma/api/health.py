"""Health: ``GET /health`` (no authentication), what an operator's probe asks. The OpenAPI
document and Swagger UI are served by quart-schema under ``/api/v1/swagger/`` (see ``oma.app``).

Three checks, each with its figures under ``checks`` (docs/oma.md, "Health"):

- **database**: a real query (the schema version) under a deadline of :data:`DB_DEADLINE_S` for
  the whole round trip, waiting for a pooled connection included. Failing or late: ``unhealthy``.
- **data directory**: ``statvfs`` of ``OMA_DATA_DIR`` (in a thread, with a deadline). Less free
  than :data:`MIN_FREE_BYTES` or :data:`MIN_FREE_FRACTION` of the file system: ``degraded``
  (a restart frees nothing, so the probe still answers 200); not readable: ``unhealthy``.
- **workers**: the replication engine, the backup engine, the copy worker and the retention
  service this process started (``OMA_REPLICATION_ENGINE``/``OMA_BACKUP_ENGINE``); one whose loop
  has ended while the OMA runs does no more work until a restart: ``unhealthy``. A worker turned
  off by configuration is ``disabled``, not a reason.

``status`` is ``healthy`` (the seed's word), ``degraded`` or ``unhealthy``; ``reasons`` lists why in
words. The HTTP status is 200 unless ``unhealthy`` (503), as load balancers and orchestrators
expect of a probe.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import trio
from quart import Blueprint, current_app

from oma.api.access import allow_vma, public
from oma.backups.copies import COPY_WORKER_KEY
from oma.backups.retention import RETENTION_KEY
from oma.state import OmaState, state
from pyapp.logs import utc_timestamp

bp = Blueprint("health", __name__)

#: The database check's deadline (seconds), connection wait included.
DB_DEADLINE_S = 2.0
#: The data directory's file system is short of space below either figure.
MIN_FREE_BYTES = 1 << 30
MIN_FREE_FRACTION = 0.05
#: statvfs of a hung file system must not hang the probe.
STATVFS_DEADLINE_S = 2.0

HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"


async def _database(st: OmaState) -> tuple[dict[str, Any], str | None]:
    started = time.monotonic()
    error: str | None = None
    version: Any = None
    with trio.move_on_after(DB_DEADLINE_S) as scope:
        try:
            # asyncpg asks the server to cancel a query whose caller gave up: a late answer does
            # not keep running (or holding its connection) after the deadline.
            version = await st.db.fetchval("SELECT max(version) FROM schema_migrations")
        except Exception as exc:  # reported, never a 500 from the probe
            error = type(exc).__name__
    latency_ms = round((time.monotonic() - started) * 1000, 2)
    if scope.cancelled_caught:
        error = f"no answer within {DB_DEADLINE_S:g} s"
    if error is not None:
        return {"status": "error", "error": error, "latency_ms": latency_ms}, f"database: {error}"
    return {"status": "ok", "schema_version": version, "latency_ms": latency_ms}, None


def _statvfs(path: Path) -> os.statvfs_result:
    return os.statvfs(path)


async def _data_dir(st: OmaState) -> tuple[dict[str, Any], str | None, bool]:
    """The data directory's figures, the reason when short or unreadable, and whether the
    reason makes the OMA unhealthy (unreadable) rather than degraded (short of space)."""
    path = st.config.data_dir
    out: dict[str, Any] = {"path": str(path)}
    try:
        with trio.fail_after(STATVFS_DEADLINE_S):
            vfs = await trio.to_thread.run_sync(_statvfs, path, abandon_on_cancel=True)
    except trio.TooSlowError:
        out["status"] = "error"
        out["error"] = f"statvfs did not answer within {STATVFS_DEADLINE_S:g} s"
        return out, f"data directory {path}: {out['error']}", True
    except OSError as exc:
        out["status"] = "error"
        out["error"] = exc.strerror or type(exc).__name__
        return out, f"data directory {path}: {out['error']}", True
    total = vfs.f_blocks * vfs.f_frsize
    free = vfs.f_bavail * vfs.f_frsize  # what an unprivileged writer may still use
    fraction = free / total if total else 0.0
    out |= {
        "total_bytes": total,
        "free_bytes": free,
        "free_percent": round(fraction * 100, 2),
        "min_free_bytes": MIN_FREE_BYTES,
        "min_free_percent": MIN_FREE_FRACTION * 100,
    }
    if free < MIN_FREE_BYTES or fraction < MIN_FREE_FRACTION:
        out["status"] = "low"
        return out, f"data directory {path}: {free} bytes free ({fraction * 100:.1f} %)", False
    out["status"] = "ok"
    return out, None, False


def _workers(st: OmaState) -> tuple[dict[str, str], list[str]]:
    """Each background worker: ``running``, ``stopped`` (its loop ended) or ``disabled``."""
    config = st.config
    extensions = current_app.extensions
    workers: dict[str, tuple[bool, Any]] = {
        "replication_engine": (config.run_replications, st.engine),
        "backup_engine": (config.run_backups, st.backup_engine),
        "copy_worker": (config.run_backups, extensions.get(COPY_WORKER_KEY)),
        "retention": (config.run_backups, extensions.get(RETENTION_KEY)),
    }
    out: dict[str, str] = {}
    reasons: list[str] = []
    for name, (enabled, worker) in workers.items():
        if not enabled:
            out[name] = "disabled"
        elif worker is None or worker.stopped.is_set():
            # Configured to run, but not running: it never started or its loop has ended.
            out[name] = "stopped"
            reasons.append(f"{name.replace('_', ' ')} is not running")
        else:
            out[name] = "running"
    return out, reasons


async def assess(st: OmaState) -> tuple[dict[str, Any], int]:
    """The health answer and its HTTP status (``GET /health``; ``/debug/health`` builds on it)."""
    database, db_reason = await _database(st)
    data_dir, space_reason, space_fatal = await _data_dir(st)
    workers, worker_reasons = _workers(st)
    fatal = [r for r in (db_reason,) if r] + ([space_reason] if space_reason and space_fatal else [])
    fatal += worker_reasons
    minor = [space_reason] if space_reason and not space_fatal else []
    status = UNHEALTHY if fatal else DEGRADED if minor else HEALTHY
    return {
        "status": status,
        "reasons": fatal + minor,
        "timestamp": utc_timestamp(),
        "uptime": f"{time.monotonic() - st.started_monotonic:.3f}s",
        # the earlier answer's field, kept for probes that read it
        "database": "ok" if database["status"] == "ok" else f"error: {database['error']}",
        "checks": {"database": database, "data_dir": data_dir, "workers": workers},
    }, (503 if status == UNHEALTHY else 200)


@bp.get("/health")
@public
@allow_vma
async def health() -> tuple[dict[str, Any], int]:
    return await assess(state())
