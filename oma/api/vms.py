"""VM Inventory: the VMs a VMA reported (inventory push or discovery), paginated.

``POST /vms/inventory`` takes the same JSON shape as the VMA's ``/api/v1/discover`` answer
(``{"vcenter": {"host", "datacenter"}, "vms": [...]}``) and upserts every VM by its VMware id
(:mod:`oma.inventory.vms`).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from quart import Blueprint, Response
from quart_schema import validate_querystring, validate_request

from oma.api.access import allow_vma, requires
from oma.api.requests import MAX_NAME, PageQuery, RequestModel, json_response
from oma.inventory import vms
from oma.inventory.vms import InventoryVCenter, InventoryVM
from oma.state import state

bp = Blueprint("vms", __name__)


class InventoryRequest(RequestModel):
    vcenter: InventoryVCenter
    vms: list[InventoryVM] = Field(max_length=20_000)


class VmListQuery(PageQuery):
    search: str | None = Field(None, max_length=MAX_NAME)


@bp.get("/vms")
@requires("viewer")
@allow_vma
@validate_querystring(VmListQuery)
async def list_vms(query_args: VmListQuery) -> Response:
    return json_response(await vms.vm_page(state().db, query_args.search, query_args))


@bp.post("/vms/inventory")
@requires("operator")
@allow_vma
@validate_request(InventoryRequest)
async def receive_inventory(data: InventoryRequest) -> tuple[dict[str, Any], int]:
    await vms.store_inventory(state().db, data.vcenter, data.vms, "inventory")
    return {"status": "accepted", "vcenter": data.vcenter.host, "vm_count": len(data.vms)}, 200


@bp.get("/vms/<vm_id>")
@requires("viewer")
@allow_vma
async def get_vm(vm_id: str) -> dict[str, Any]:
    return await vms.get_vm(state().db, vm_id)
