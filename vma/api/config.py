"""``PUT /api/v1/config``: the dynamic allocation the OMA made (NBD port, export, device).

``nbd_port`` + ``export_name`` name the target of a replication whose request carries no
``targets`` and whose VM has a single disk (``nbd://<nbd_host>:<nbd_port>/<export_name>``,
``nbd_host`` defaulting to 127.0.0.1, the tunnel's end). ``GET`` answers the same shape."""

from __future__ import annotations

import logging
from typing import Any

from quart import Blueprint
from quart_schema import document_request

from pyapp.logs import log_context
from vma.api.errors import ApiError, json_object
from vma.api.schemas import ConfigRequest, refuse_unknown_fields
from vma.state import state

bp = Blueprint("config", __name__)
log = logging.getLogger(__name__)

FIELDS = ("nbd_port", "export_name", "target_device", "nbd_host")


def _current() -> dict[str, Any]:
    c = state().config
    return {
        "nbd_port": c.nbd_port,
        "export_name": c.export_name,
        "target_device": c.target_device,
        "nbd_host": c.nbd_host,
    }


@bp.put("/config")
@document_request(ConfigRequest)
async def put_config() -> dict[str, Any]:
    body = refuse_unknown_fields(await json_object(), ConfigRequest)
    if not body:
        raise ApiError.invalid("nothing to update")
    port = body.get("nbd_port")
    if "nbd_port" in body and (not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535):
        raise ApiError.invalid("nbd_port must be an integer from 1 to 65535")
    for key in ("export_name", "target_device", "nbd_host"):
        value = body.get(key)
        if key in body and (not isinstance(value, str) or not value or len(value) > 4096 or "\n" in value):
            raise ApiError.invalid(f"{key} must be a non-empty string")
    c = state().config
    if "nbd_port" in body:
        c.nbd_port = port
    if "export_name" in body:
        c.export_name = body["export_name"]
    if "target_device" in body:
        c.target_device = body["target_device"]
    if "nbd_host" in body:
        c.nbd_host = body["nbd_host"]
    with log_context(action="config_update"):
        log.info("configuration updated", extra={"fields": sorted(body)})
    return {"status": "updated", "config": _current()}


@bp.get("/config")
async def get_config() -> dict[str, Any]:
    return {"status": "current", "config": _current()}
