"""Debug (administrators only): deep health, failover jobs, the route table, recent logs."""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from pydantic import BaseModel, Field
from quart import Blueprint, current_app
from quart_schema import validate_querystring

from oma.api.common import Page, page_body, row_dict
from oma.auth import requires
from oma.state import state
from oma.vma_client import VmaError
from pyapp.logs import utc_timestamp

bp = Blueprint("debug", __name__)


class LogsQuery(BaseModel):
    limit: int = Field(200, ge=1, le=1000)
    level: Literal["debug", "info", "warning", "error", "critical"] = "debug"


@bp.get("/debug/health")
@requires("admin")
async def debug_health() -> dict[str, Any]:
    st = state()
    started = time.monotonic()
    db_version = await st.db.fetchval("SHOW server_version")
    schema = await st.db.fetchval("SELECT max(version) FROM schema_migrations")
    db_ms = round((time.monotonic() - started) * 1000, 2)
    counts = await st.db.fetchrow(
        "SELECT (SELECT count(*) FROM vms) AS vms, (SELECT count(*) FROM vm_contexts) AS vm_contexts,"
        " (SELECT count(*) FROM replication_jobs) AS replication_jobs,"
        " (SELECT count(*) FROM replication_jobs WHERE status IN ('pending', 'replicating')) AS active_jobs,"
        " (SELECT count(*) FROM vma_enrollments WHERE status = 'approved') AS active_vmas"
    )
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
    return {
        "status": "healthy",
        "timestamp": utc_timestamp(),
        "uptime_seconds": round(time.monotonic() - st.started_monotonic, 3),
        "database": {
            "server_version": db_version,
            "schema_version": schema,
            "latency_ms": db_ms,
            "pool": st.db.pool_stats(),
            "embedded": st.config.database_url is None,
        },
        "counts": dict(counts) if counts else {},
        "vma": vma,
    }


@bp.get("/debug/failover-jobs")
@requires("admin")
@validate_querystring(Page)
async def debug_failover_jobs(query_args: Page) -> dict[str, Any]:
    db = state().db
    rows = await db.fetch(
        "SELECT id, vm_context_id, failover_type, status, error_message, created_at, updated_at"
        " FROM failover_jobs ORDER BY created_at DESC LIMIT $1 OFFSET $2",
        query_args.limit,
        query_args.offset,
    )
    total = await db.fetchval("SELECT count(*) FROM failover_jobs")
    return page_body("failover_jobs", [row_dict(r) for r in rows], total, query_args)


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
