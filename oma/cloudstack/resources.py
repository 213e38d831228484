"""What CloudStack offers the OMA: zones, domains, templates, compute and disk offerings,
networks, VMs — listed with CloudStack's commands and shown with the OMA's field names
(snake_case, sizes in bytes or GiB as named).

Each ``*_view`` function turns one CloudStack object into the OMA's; :func:`discover` lists
everything a settings page needs at once (the calls run concurrently).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from oma.cloudstack.client import CloudStackClient
from pyapp.api import ApiError

GIB = 1024**3
T = TypeVar("T")


async def gather(*calls: Callable[[], Awaitable[T]]) -> list[T]:
    """Run ``calls`` concurrently; their results in order. The first failure cancels the others
    and is raised as it is (not in an exception group: an :class:`~pyapp.api.ApiError` must
    reach the error handler unwrapped)."""
    results: list[T | None] = [None] * len(calls)
    errors: list[Exception] = []

    async def run(i: int, call: Callable[[], Awaitable[T]], nursery: trio.Nursery) -> None:
        try:
            results[i] = await call()
        except Exception as exc:
            errors.append(exc)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for i, call in enumerate(calls):
            nursery.start_soon(run, i, call, nursery)
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]  # every slot was filled


def _text(item: dict[str, Any], key: str) -> str:
    value = item.get(key)
    return "" if value is None else str(value)


def _int(item: dict[str, Any], key: str) -> int | None:
    value = item.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def zone_view(z: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": _text(z, "id"),
        "name": _text(z, "name"),
        "description": _text(z, "description"),
        "allocation_state": _text(z, "allocationstate"),
        "network_type": _text(z, "networktype"),
    }


def domain_view(d: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": _text(d, "id"),
        "name": _text(d, "name"),
        "path": _text(d, "path"),
        "parent_id": _text(d, "parentdomainid") or None,
    }


def template_view(t: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": _text(t, "id"),
        "name": _text(t, "name"),
        "description": _text(t, "displaytext"),
        "os_type": _text(t, "ostypename"),
        "size_bytes": _int(t, "size"),
        "is_ready": bool(t.get("isready")),
        "hypervisor": _text(t, "hypervisor"),
        "zone_id": _text(t, "zoneid"),
    }


def service_offering_view(o: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": _text(o, "id"),
        "name": _text(o, "name"),
        "description": _text(o, "displaytext"),
        "cpu": _int(o, "cpunumber"),
        "cpu_speed_mhz": _int(o, "cpuspeed"),
        "memory_mb": _int(o, "memory"),
        "is_customized": bool(o.get("iscustomized")),
        "storage_type": _text(o, "storagetype"),
    }


def disk_offering_view(o: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": _text(o, "id"),
        "name": _text(o, "name"),
        "description": _text(o, "displaytext"),
        "disk_size_gb": _int(o, "disksize"),
        "is_customized": bool(o.get("iscustomized")),
        "storage_type": _text(o, "storagetype"),
    }


def network_view(n: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": _text(n, "id"),
        "name": _text(n, "name"),
        "description": _text(n, "displaytext"),
        "zone_id": _text(n, "zoneid"),
        "zone_name": _text(n, "zonename"),
        "state": _text(n, "state"),
        "type": _text(n, "type"),
        "cidr": _text(n, "cidr") or None,
        "account": _text(n, "account") or None,
        "domain": _text(n, "domain") or None,
    }


def nic_view(n: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": _text(n, "id"),
        "mac_address": _text(n, "macaddress").lower(),
        "ip_address": _text(n, "ipaddress") or None,
        "ip6_address": _text(n, "ip6address") or None,
        "network_id": _text(n, "networkid"),
        "network_name": _text(n, "networkname"),
        "is_default": bool(n.get("isdefault")),
    }


def vm_view(v: dict[str, Any]) -> dict[str, Any]:
    nics = v.get("nic")
    return {
        "id": _text(v, "id"),
        "name": _text(v, "name"),
        "display_name": _text(v, "displayname"),
        "state": _text(v, "state"),
        "zone_id": _text(v, "zoneid"),
        "zone_name": _text(v, "zonename"),
        "account": _text(v, "account"),
        "domain": _text(v, "domain"),
        "domain_id": _text(v, "domainid"),
        "hypervisor": _text(v, "hypervisor"),
        "nics": [nic_view(n) for n in nics if isinstance(n, dict)] if isinstance(nics, list) else [],
    }


def volume_view(v: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": _text(v, "id"),
        "name": _text(v, "name"),
        "type": _text(v, "type"),
        "state": _text(v, "state"),
        "size_bytes": _int(v, "size"),
        "zone_id": _text(v, "zoneid"),
        "disk_offering_id": _text(v, "diskofferingid") or None,
        "virtual_machine_id": _text(v, "virtualmachineid") or None,
        "device_id": _int(v, "deviceid"),
    }


async def zones(client: CloudStackClient) -> list[dict[str, Any]]:
    return [zone_view(z) for z in await client.list("listZones")]


async def domains(client: CloudStackClient, name: str = "") -> list[dict[str, Any]]:
    """The domains the key sees; with ``name`` (a name or a path such as ``ROOT/sub``), that one
    only (422 when CloudStack has none of that name)."""
    found = [domain_view(d) for d in await client.list("listDomains", listall=True)]
    if not name:
        return found
    wanted = name.strip("/").lower()
    chosen = [
        d for d in found if wanted in (d["name"].lower(), d["path"].strip("/").lower(), d["id"].lower())
    ]
    if not chosen:
        raise ApiError.unprocessable(f"CloudStack has no domain {name!r} that this API key sees")
    return chosen


async def templates(client: CloudStackClient, zone_id: str = "") -> list[dict[str, Any]]:
    params: dict[str, Any] = {"templatefilter": "executable"}
    if zone_id:
        params["zoneid"] = zone_id
    return [template_view(t) for t in await client.list("listTemplates", **params)]


async def service_offerings(client: CloudStackClient) -> list[dict[str, Any]]:
    return [service_offering_view(o) for o in await client.list("listServiceOfferings")]


async def disk_offerings(client: CloudStackClient) -> list[dict[str, Any]]:
    return [disk_offering_view(o) for o in await client.list("listDiskOfferings")]


async def networks(client: CloudStackClient, zone_id: str = "") -> list[dict[str, Any]]:
    """The networks the key's account may deploy into (its own and shared ones)."""
    params: dict[str, Any] = {"zoneid": zone_id} if zone_id else {}
    return [network_view(n) for n in await client.list("listNetworks", **params)]


async def virtual_machines(client: CloudStackClient, **params: Any) -> list[dict[str, Any]]:
    return [vm_view(v) for v in await client.list("listVirtualMachines", listall=True, **params)]


async def discover(client: CloudStackClient, *, domain: str = "", zone_id: str = "") -> dict[str, Any]:
    """Everything a settings page offers to choose from. Zones are listed first: a key or URL
    CloudStack refuses fails there, once, before the other calls are made."""
    zone_list = await zones(client)
    lists = await gather(
        lambda: domains(client, domain),
        lambda: templates(client, zone_id),
        lambda: service_offerings(client),
        lambda: disk_offerings(client),
        lambda: networks(client, zone_id),
    )
    keys = ("domains", "templates", "service_offerings", "disk_offerings", "networks")
    return {"zones": zone_list, **dict(zip(keys, lists, strict=True))}
