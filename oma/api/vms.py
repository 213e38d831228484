"""VM Inventory: the VMs a VMA reported (inventory push or discovery), paginated.

``POST /vms/inventory`` takes the same JSON shape as the VMA's ``/api/v1/discover`` answer
(``{"vcenter": {"host", "datacenter"}, "vms": [...]}``) and upserts every VM by its VMware id.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint, Response
from quart_schema import validate_querystring, validate_request

from oma.api.requests import MAX_NAME, MAX_TEXT, PageQuery, RequestModel, json_response
from oma.auth import allow_vma, requires
from oma.state import state
from oma.store.pages import json_page
from oma.store.rows import row_dict
from pyapp.api import ApiError
from pyapp.db import Connection, Database
from pyapp.http_limits import SERIAL_MAX

bp = Blueprint("vms", __name__)

VM_COLUMNS = (
    "id, name, path, vcenter_host, datacenter, power_state, guest_os, memory_mb, num_cpu,"
    " disks, networks, source, first_seen_at, updated_at"
)


class InventoryVCenter(RequestModel):
    host: str = Field(min_length=1, max_length=MAX_NAME)
    datacenter: str = Field("", max_length=MAX_NAME)


class InventoryVM(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=MAX_NAME)
    name: str = Field(min_length=1, max_length=MAX_NAME)
    path: str = Field(min_length=1, max_length=MAX_TEXT)
    power_state: str | None = Field(None, max_length=64)
    guest_os: str | None = Field(None, max_length=MAX_NAME)
    memory_mb: int | None = Field(None, ge=0, le=SERIAL_MAX)  # an integer column
    num_cpu: int | None = Field(None, ge=0, le=4096)
    disks: list[dict[str, Any]] = Field(default_factory=list, max_length=256)
    networks: list[dict[str, Any]] = Field(default_factory=list, max_length=256)


class InventoryRequest(RequestModel):
    vcenter: InventoryVCenter
    vms: list[InventoryVM] = Field(max_length=20_000)


class VmListQuery(PageQuery):
    search: str | None = Field(None, max_length=MAX_NAME)


async def upsert_vms(
    db: Database | Connection, vcenter: InventoryVCenter, vms: Sequence[InventoryVM], source: str
) -> None:
    if not vms:
        return
    await db.executemany(
        "INSERT INTO vms (id, name, path, vcenter_host, datacenter, power_state, guest_os, memory_mb,"
        " num_cpu, disks, networks, source)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11::jsonb, $12)"
        " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, path = EXCLUDED.path,"
        " vcenter_host = EXCLUDED.vcenter_host, datacenter = EXCLUDED.datacenter,"
        " power_state = EXCLUDED.power_state, guest_os = EXCLUDED.guest_os,"
        " memory_mb = EXCLUDED.memory_mb, num_cpu = EXCLUDED.num_cpu, disks = EXCLUDED.disks,"
        " networks = EXCLUDED.networks, source = EXCLUDED.source, updated_at = now()",
        [
            (
                vm.id,
                vm.name,
                vm.path,
                vcenter.host,
                vcenter.datacenter,
                vm.power_state,
                vm.guest_os,
                vm.memory_mb,
                vm.num_cpu,
                json.dumps(vm.disks),
                json.dumps(vm.networks),
                source,
            )
            for vm in vms
        ],
    )


@bp.get("/vms")
@requires("viewer")
@allow_vma
@validate_querystring(VmListQuery)
async def list_vms(query_args: VmListQuery) -> Response:
    pattern = None if query_args.search is None else f"%{query_args.search}%"
    return json_response(await json_page(
        state().db,
        "vms",
        columns=VM_COLUMNS,
        from_where="FROM vms t WHERE ($1::text IS NULL OR t.name ILIKE $1)",
        order=[("name", "ASC"), ("id", "ASC")],
        args=(pattern,),
        page=query_args,
    ))


@bp.post("/vms/inventory")
@requires("operator")
@allow_vma
@validate_request(InventoryRequest)
async def receive_inventory(data: InventoryRequest) -> tuple[dict[str, Any], int]:
    async with state().db.transaction() as conn:
        await upsert_vms(conn, data.vcenter, data.vms, "inventory")
    return {"status": "accepted", "vcenter": data.vcenter.host, "vm_count": len(data.vms)}, 200


@bp.get("/vms/<vm_id>")
@requires("viewer")
@allow_vma
async def get_vm(vm_id: str) -> dict[str, Any]:
    row = await state().db.fetchrow(f"SELECT {VM_COLUMNS} FROM vms WHERE id = $1", vm_id)
    if row is None:
        raise ApiError.not_found(f"VM {vm_id!r} not found")
    return row_dict(row)
