"""``POST /api/v1/discover``: the VMs of a vCenter datacenter, optionally filtered by name.

Each VM carries the seed's fields (id, name, path, power_state, guest_os, memory_mb, num_cpu)
plus ``disks`` (id ``disk-<key>``, key, capacity_bytes, path, cbt_enabled, change_id) and
``networks`` (per NIC its network). ``filter`` is a case-insensitive substring of the name."""

from __future__ import annotations

import logging
from typing import Any

from quart import Blueprint
from quart_schema import document_request

from pyapp.logs import log_context
from vma.api.errors import ApiError, json_object
from vma.api.schemas import DiscoverRequest, refuse_unknown_fields
from vma.api.validation import text, vcenter_login
from vma.state import state
from vma.vsphere.client import VSphere, VSphereError, run

bp = Blueprint("discover", __name__)
log = logging.getLogger(__name__)


@bp.post("/discover")
@document_request(DiscoverRequest)
async def discover() -> dict[str, Any]:
    body = refuse_unknown_fields(await json_object(), DiscoverRequest)
    login = vcenter_login(body)
    datacenter = text(body, "datacenter", required=False, max_len=255)
    name_filter = text(body, "filter", required=False, max_len=255)
    config = state().config
    with log_context(action="discover"):
        try:
            vs = await run(VSphere.connect, login, insecure=config.vcenter_insecure)
            try:
                vms = await run(vs.discover, datacenter, name_filter)
            finally:
                await run(vs.disconnect)
        except VSphereError as e:
            log.warning("discovery failed: %s", e)
            raise ApiError.failed(str(e)) from e
        log.info("discovered %d VMs", len(vms), extra={"datacenter": datacenter, "filter": name_filter})
    return {"vcenter": {"host": login.host, "datacenter": datacenter}, "vms": vms}
