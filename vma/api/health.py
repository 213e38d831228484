"""``GET /api/v1/health``: the service is up, since how long, and the tunnel's state
(``disabled``, ``connecting``, ``up`` or ``down`` with its last error)."""

from __future__ import annotations

import time
from typing import Any

from quart import Blueprint

from vma.api.errors import utc_now_iso
from vma.state import state

bp = Blueprint("health", __name__)


def format_uptime(seconds: float) -> str:
    """Go's ``time.Duration`` notation, as the seed shows it: ``1h2m3.5s``, ``4.2s``, ``691ms``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = ""
    if hours >= 1:
        out += f"{int(hours)}h"
    if hours >= 1 or minutes >= 1:
        out += f"{int(minutes)}m"
    return out + f"{secs:.3f}".rstrip("0").rstrip(".") + "s"


@bp.get("/health")
async def health() -> dict[str, Any]:
    uptime = time.monotonic() - state().started_mono
    return {
        "status": "healthy",
        "timestamp": utc_now_iso(),
        "uptime": format_uptime(uptime),
        "uptime_seconds": round(uptime, 3),
        "tunnel": state().tunnel.health(),
    }
