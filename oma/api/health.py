"""Health: ``GET /health`` (no authentication). The OpenAPI document and Swagger UI are served
by quart-schema under ``/api/v1/swagger/`` (see ``oma.app``)."""

from __future__ import annotations

import time
from typing import Any

from quart import Blueprint

from oma.auth import allow_vma, public
from oma.state import state
from pyapp.logs import utc_timestamp

bp = Blueprint("health", __name__)


@bp.get("/health")
@public
@allow_vma
async def health() -> tuple[dict[str, Any], int]:
    st = state()
    try:
        await st.db.fetchval("SELECT 1")
        database = "ok"
    except Exception as exc:  # report, do not fail the probe with a 500
        database = f"error: {type(exc).__name__}"
    healthy = database == "ok"
    return {
        "status": "healthy" if healthy else "degraded",
        "timestamp": utc_timestamp(),
        "uptime": f"{time.monotonic() - st.started_monotonic:.3f}s",
        "database": database,
    }, (200 if healthy else 503)
