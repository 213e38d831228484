"""``GET /api/v1/status/{job_id}`` (the seed's summary) and ``GET /api/v1/progress/{job_id}``
(the detail the OMA's progress proxy forwards: phase, current disk, bytes, percent, throughput,
ETA, per-disk figures)."""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from vma.state import state

bp = Blueprint("status", __name__)


@bp.get("/status/<job_id>")
async def job_status(job_id: str) -> dict[str, Any]:
    return state().tracker.get(job_id).status_body()


@bp.get("/progress/<job_id>")
async def job_progress(job_id: str) -> dict[str, Any]:
    return state().tracker.get(job_id).progress_body()
