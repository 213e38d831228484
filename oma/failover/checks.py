"""Is a VM ready to fail over? The ``validate`` step and ``GET /failover/{vm_id}/readiness``.

Each check is a name, whether it passed and a message; the plan a passing VM gets is what the
later steps use: its replica volumes in disk order, the CloudStack network of each NIC, the
service offering, zone and template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from oma.cloudstack.client import CloudStackClient
from oma.cloudstack.settings import StoredSettings
from oma.failover import cloud
from oma.failover.jobs import ACTIVE, TEST
from pyapp.db import Database

CONTEXT_COLUMNS = (
    "context_id, vm_name, vmware_vm_id, vcenter_host, vm_path, current_status, cpu_count, memory_mb"
)


@dataclass(frozen=True)
class PlannedVolume:
    disk_id: str
    replica_volume_id: str
    cloudstack_volume_id: str


@dataclass
class Readiness:
    checks: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[PlannedVolume] = field(default_factory=list)
    network_ids: list[str] = field(default_factory=list)
    offering: dict[str, Any] | None = None
    cpus: int = 0
    memory_mb: int = 0

    @property
    def ready(self) -> bool:
        return all(c["passed"] for c in self.checks)

    def check(self, name: str, passed: bool, message: str) -> None:
        self.checks.append({"name": name, "passed": passed, "message": message})

    def failures(self) -> str:
        return "; ".join(f"{c['name']}: {c['message']}" for c in self.checks if not c["passed"])

    def describe(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "checks": self.checks,
            "volumes": [v.__dict__ for v in self.volumes],
            "network_ids": self.network_ids,
            "service_offering": self.offering,
            "cpus": self.cpus,
            "memory_mb": self.memory_mb,
        }


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


async def readiness(
    db: Database,
    client: CloudStackClient,
    stored: StoredSettings,
    context: dict[str, Any],
    kind: str = TEST,
    own_job: str | None = None,
) -> Readiness:
    """Every check of the module doc for the VM ``context`` (a ``vm_contexts`` row); ``own_job``
    is the job validating (it holds the VM itself)."""
    out = Readiness()
    ctx_id, vm_id, vcenter = context["context_id"], context["vmware_vm_id"], context["vcenter_host"]
    inventory = await db.fetchrow(
        "SELECT num_cpu, memory_mb, disks, networks FROM vms"
        " WHERE id = $1 AND ($2 = '' OR vcenter_host = $2)",
        vm_id,
        vcenter,
    )

    # the replication: the latest job completed, none running
    last = await db.fetchrow(
        "SELECT id, status FROM replication_jobs WHERE vm_context_id = $1"
        " ORDER BY created_at DESC, id DESC LIMIT 1",
        ctx_id,
    )
    if last is None:
        out.check("replication", False, "the VM was never replicated")
    elif last["status"] != "completed":
        out.check(
            "replication", False, f"the latest replication {last['id']} is {last['status']}, not completed"
        )
    else:
        out.check("replication", True, f"replication {last['id']} completed")

    # the replica volumes, in the inventory's disk order, on the OMA VM
    rows = await db.fetch(
        "SELECT id, disk_id, backend, state, cloudstack_volume_id FROM replica_volumes"
        " WHERE vcenter_host = $1 AND vm_id = $2",
        vcenter,
        vm_id,
    )
    order = [str(d.get("id")) for d in _json(inventory["disks"])] if inventory is not None else []
    rows = sorted(
        rows, key=lambda r: (order.index(r["disk_id"]) if r["disk_id"] in order else len(order), r["disk_id"])
    )
    unusable = [
        r["disk_id"]
        for r in rows
        if r["backend"] != "cloudstack" or r["state"] != "ready" or not r["cloudstack_volume_id"]
    ]
    missing = [d for d in order if d not in {r["disk_id"] for r in rows}]
    if not rows:
        out.check("volumes", False, "the VM has no replica volumes")
    elif unusable or missing:
        out.check(
            "volumes",
            False,
            f"disks without a complete CloudStack replica volume: {', '.join(unusable + missing)}",
        )
    else:
        on_oma = {
            str(v["id"])
            for v in await client.list(
                "listVolumes", virtualmachineid=stored.resources.oma_vm_id, listall=True
            )
        }
        away = [r["disk_id"] for r in rows if r["cloudstack_volume_id"] not in on_oma]
        if away:
            out.check("volumes", False, f"replica volumes not attached to the OMA VM: {', '.join(away)}")
        else:
            out.volumes = [PlannedVolume(r["disk_id"], r["id"], r["cloudstack_volume_id"]) for r in rows]
            out.check("volumes", True, f"{len(rows)} replica volumes attached to the OMA VM")

    # a network mapping for every NIC (test networks for a test failover)
    nics = [n for n in _json(inventory["networks"]) if isinstance(n, dict)] if inventory is not None else []
    mappings = {
        r["source_network_name"]: r["destination_network_id"]
        for r in await db.fetch(
            "SELECT source_network_name, destination_network_id FROM network_mappings"
            " WHERE vm_context_id = $1 AND is_test_network = $2",
            ctx_id,
            kind == TEST,
        )
    }
    kind_name = "test network" if kind == TEST else "network"
    if not nics:
        out.check("networks", False, "the inventory knows no network card of the VM: discover it again")
    else:
        unmapped = sorted({str(n.get("network")) for n in nics if n.get("network") not in mappings})
        if unmapped:
            out.check("networks", False, f"no {kind_name} mapping for: {', '.join(unmapped)}")
        else:
            out.network_ids = [mappings[str(n["network"])] for n in nics]
            out.check("networks", True, f"{len(nics)} network cards mapped to {kind_name}s")

    # an offering that fits, and the rest of what a deployment needs
    cpus = (inventory["num_cpu"] if inventory is not None else None) or context["cpu_count"] or 0
    memory = (inventory["memory_mb"] if inventory is not None else None) or context["memory_mb"] or 0
    out.cpus, out.memory_mb = int(cpus), int(memory)
    if not cpus or not memory:
        out.check("service_offering", False, "the inventory knows neither the VM's CPUs nor its memory")
    else:
        out.offering = await cloud.offering_for(
            client, cpus=out.cpus, memory_mb=out.memory_mb, preferred=stored.resources.service_offering_id
        )
        if out.offering is None:
            out.check("service_offering", False, f"no service offering has {cpus} CPUs and {memory} MB")
        else:
            out.check("service_offering", True, f"{out.offering['name']} fits {cpus} CPUs and {memory} MB")
    lacking = [n for n in ("zone_id", "template_id", "oma_vm_id") if not getattr(stored.resources, n)]
    out.check(
        "cloudstack_settings",
        not lacking,
        f"the CloudStack settings have no {', '.join(lacking)}"
        if lacking
        else "zone, template and OMA VM set",
    )

    active = await db.fetchval(
        "SELECT id FROM failover_jobs WHERE vm_context_id = $1 AND status = ANY($2::text[])"
        " AND id IS DISTINCT FROM $3 LIMIT 1",
        ctx_id,
        list(ACTIVE),
        own_job,
    )
    out.check(
        "no_active_job",
        active is None,
        f"failover job {active} holds the VM" if active else "no failover job holds the VM",
    )
    return out
