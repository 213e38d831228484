"""Debug (administrators only): deep health, the route table, recent logs.

Every answer here is real data of this process or its database. (The seed's
``/debug/failover-jobs`` is not served: no failover engine exists to fill its table, so it could
only ever answer an empty list.)"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import trio
from pydantic import BaseModel, Field
from quart import Blueprint, current_app
from quart_schema import validate_querystring

from oma.api.access import requires
from oma.api.health import DB_DEADLINE_S, assess
from oma.state import state
from oma.vma_client import VmaError
from pyapp.db import PostgresError

bp = Blueprint("debug", __name__)


class LogsQuery(BaseModel):
    limit: int = Field(200, ge=1, le=1000)
    level: Literal["debug", "info", "warning", "error", "critical"] = "debug"


@bp.get("/debug/health")
@requires("admin")
async def debug_health() -> tuple[dict[str, Any], int]:
    """``GET /health``'s checks (status, reasons, the same HTTP status), then deeper figures: the
    database's version, pool and row counts (when the database answers) and the VMA's reach."""
    st = state()
    body, status = await assess(st)
    body["uptime_seconds"] = round(time.monotonic() - st.started_monotonic, 3)
    database: dict[str, Any] = dict(body["checks"]["database"])
    database |= {"pool": st.db.pool_stats(), "embedded": st.config.database_url is None}
    counts: dict[str, Any] = {}
    if database["status"] == "ok":
        try:
            with trio.fail_after(DB_DEADLINE_S):
                database["server_version"] = await st.db.fetchval("SHOW server_version")
                row = await st.db.fetchrow(
                    "SELECT (SELECT count(*) FROM vms) AS vms,"
                    " (SELECT count(*) FROM vm_contexts) AS vm_contexts,"
                    " (SELECT count(*) FROM replication_jobs) AS replication_jobs,"
                    " (SELECT count(*) FROM replication_jobs WHERE status IN ('pending', 'replicating'))"
                    " AS active_jobs,"
                    " (SELECT count(*) FROM vma_enrollments WHERE status = 'approved') AS active_vmas"
                )
                counts = dict(row) if row else {}
        except (trio.TooSlowError, PostgresError) as exc:
            database["details_error"] = type(exc).__name__
    vma: dict[str, Any] = {"url": st.vma.base_url}
    vma_started = time.monotonic()
    try:
        await st.vma.progress("__oma_debug_probe__")
        vma["reachable"] = True
    except VmaError as exc:
        # A 404 for the probe job proves the VMA answers; anything else is reported as is.
        vma["reachable"] = exc.status is not None
        vma["detail"] = exc.message
    vma["latency_ms"] = round((time.monotonic() - vma_started) * 1000, 2)
    body |= {"database": database, "counts": counts, "vma": vma}
    return body, status


@bp.get("/debug/endpoints")
@requires("admin")
async def debug_endpoints() -> dict[str, Any]:
    endpoints = sorted(
        (
            {
                "path": rule.rule,
                "methods": sorted(m for m in rule.methods or () if m not in ("HEAD", "OPTIONS")),
                "endpoint": rule.endpoint,
            }
            for rule in current_app.url_map.iter_rules()
            if rule.endpoint != "static"
        ),
        key=lambda e: (str(e["path"]), str(e["endpoint"])),
    )
    return {"endpoints": endpoints, "count": len(endpoints)}


@bp.get("/debug/logs")
@requires("admin")
@validate_querystring(LogsQuery)
async def debug_logs(query_args: LogsQuery) -> dict[str, Any]:
    recent = state().recent_logs
    if recent is None:
        return {"logs": [], "count": 0, "note": "in-memory log capture is not enabled in this process"}
    records = recent.snapshot(
        limit=query_args.limit, min_level=logging.getLevelName(query_args.level.upper())
    )
    return {"logs": records, "count": len(records)}
