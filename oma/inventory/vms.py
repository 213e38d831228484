"""The VM inventory (``vms``): the VMs a VMA reported, by inventory push (``POST /vms/inventory``,
the shape of the VMA's ``/api/v1/discover`` answer) or discovery, upserted by their VMware id."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from oma.store.pages import Page, json_page
from oma.store.rows import row_dict
from pyapp.api import ApiError, RequestModel
from pyapp.db import Connection, Database
from pyapp.http_limits import SERIAL_MAX

#: The longest name and the longest inventory path a record holds.
NAME_LIMIT = 255
PATH_LIMIT = 4096
VM_COLUMNS = (
    "id, name, path, vcenter_host, datacenter, power_state, guest_os, memory_mb, num_cpu,"
    " disks, networks, source, first_seen_at, updated_at"
)


class InventoryVCenter(RequestModel):
    host: str = Field(min_length=1, max_length=NAME_LIMIT)
    datacenter: str = Field("", max_length=NAME_LIMIT)


class InventoryVM(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=NAME_LIMIT)
    name: str = Field(min_length=1, max_length=NAME_LIMIT)
    path: str = Field(min_length=1, max_length=PATH_LIMIT)
    power_state: str | None = Field(None, max_length=64)
    guest_os: str | None = Field(None, max_length=NAME_LIMIT)
    memory_mb: int | None = Field(None, ge=0, le=SERIAL_MAX)  # an integer column
    num_cpu: int | None = Field(None, ge=0, le=4096)
    disks: list[dict[str, Any]] = Field(default_factory=list, max_length=256)
    networks: list[dict[str, Any]] = Field(default_factory=list, max_length=256)


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


async def store_inventory(
    db: Database, vcenter: InventoryVCenter, vms: Sequence[InventoryVM], source: str
) -> None:
    """Upsert every VM of one report in one transaction."""
    async with db.transaction() as conn:
        await upsert_vms(conn, vcenter, vms, source)


async def vm_page(db: Database, search: str | None, page: Page) -> str:
    """A page of the inventory by name (``search``: a substring, case-insensitive), as JSON."""
    pattern = None if search is None else f"%{search}%"
    return await json_page(
        db,
        "vms",
        columns=VM_COLUMNS,
        from_where="FROM vms t WHERE ($1::text IS NULL OR t.name ILIKE $1)",
        order=[("name", "ASC"), ("id", "ASC")],
        args=(pattern,),
        page=page,
    )


async def get_vm(db: Database, vm_id: str) -> dict[str, Any]:
    row = await db.fetchrow(f"SELECT {VM_COLUMNS} FROM vms WHERE id = $1", vm_id)
    if row is None:
        raise ApiError.not_found(f"VM {vm_id!r} not found")
    return row_dict(row)
