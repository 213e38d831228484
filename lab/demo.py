"""The demo: the product's replication flow end to end on this machine, on embedded defaults.

What runs, all on loopback and in this process:

- the vSphere lab (:mod:`lab`): a vCenter simulator whose VMs have real disk images — ``web01``
  with two disks (an ext4 system disk and an ext4 data disk, both with files) and ``db01`` with one;
- the OMA (``oma``) with an embedded PostgreSQL in the demo's data directory and its replication
  engine, and the VMA (``vma``) reading the lab's snapshot images with ``nbdkit``;
- the lab CloudStack (``python -m lab.cloudstack``, a test double of CloudStack's API, its own
  process): the OMA VM's volume devices appear under the demo's ``cloudstack/dev`` (the OMA's
  ``device_root``);
- the VMA enrolled with the OMA (pairing code, ed25519 proof, approval), a default VMware
  credential stored in the OMA, the VMs discovered through the OMA, CloudStack configured through
  the OMA's API (``/ossea/config-streamlined``: zone, custom-size disk offering; the OMA VM found
  by its MAC address) and each VM's network mapped to a CloudStack network.

Then, per VM, a replication (full pass into new CloudStack data volumes, attached to the OMA VM
and exported by the OMA with ``qemu-nbd``), guest writes, a second replication (incremental:
CBT's changed extents only, into the same volumes, still attached), and the verification: each
target volume equals the source disk under ``qemu-img compare`` and no snapshot is left in the
lab. A summary table closes the replication part, with the CloudStack volumes made.

Then the backup part, on web01's data disk: a local repository, a full backup, the guest changing
its files, an incremental backup (QCOW2 overlays written by the mover, with manifests); every file
of both points restored through file-level restore (dissect, no kernel mount) and compared with
what the guest had; the newest point verified against its manifests.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from lab import DiskSpec, Lab, LabVM, MiB, Partition, rewrite_partition
from oma.app import create_app
from oma.config import OmaConfig
from pyapp.cli import iec_size
from pyapp.nbd_export import free_tcp_port
from pyapp.process import aterminate
from vma.config import VmaConfig
from vma.server import serve_vma
from vma.vsphere.client import VCenterLogin, VSphere

TERMINAL = ("completed", "failed", "cancelled")
#: The lab CloudStack's login and what the demo chooses in it (lab/cloudstack/default_seed.json).
CLOUDSTACK_API_KEY = "demo-api-key"
CLOUDSTACK_SECRET_KEY = "demo-secret-key"
CLOUDSTACK_ZONE = "lab-zone-1"
CLOUDSTACK_NETWORK = "lab-isolated"
OMA_VM_MAC = "02:00:4f:4d:41:01"
CLOUDSTACK_READY = "CloudStack lab listening on "


def random_files(prefix: str, count: int, size: int, seed: int) -> dict[str, bytes]:
    """``count`` files of ``size`` bytes: half random (incompressible), half text."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {"etc/hostname": f"{prefix}\n".encode()}
    for i in range(count):
        if i % 2:
            files[f"srv/{prefix}/blob-{i:03d}.bin"] = rng.randbytes(size)
        else:
            line = f"{prefix} record {i} ".encode()
            files[f"srv/{prefix}/log-{i:03d}.txt"] = (line * (size // len(line) + 1))[:size]
    return files


def build_lab_vms(lab: Lab) -> list[LabVM]:
    web = lab.create_vm(
        "web01",
        [
            DiskSpec(
                320 * MiB, [Partition(256 * MiB, "ext4", "root", random_files("web01", 40, 2 * MiB, 1))]
            ),
            DiskSpec(128 * MiB, [Partition(120 * MiB, "ext4", "data", random_files("data", 24, 2 * MiB, 2))]),
        ],
        guest_id="ubuntu64Guest",
        memory_mb=4096,
        num_cpus=2,
    )
    db = lab.create_vm(
        "db01",
        [DiskSpec(256 * MiB, [Partition(240 * MiB, "ext4", "root", random_files("db01", 48, 2 * MiB, 3))])],
        guest_id="debian12_64Guest",
        memory_mb=8192,
        num_cpus=4,
    )
    return [web, db]


@dataclass
class PassResult:
    vm: str
    kind: str
    seconds: float
    bytes_transferred: int
    disks: list[dict[str, Any]]
    status: str
    error: str | None

    @property
    def bytes_written(self) -> int:
        """Data written to the volumes (the job's own total also counts zeroed ranges)."""
        return sum(d["bytes_written"] or 0 for d in self.disks)

    equal: dict[str, bool] = field(default_factory=dict)


class Api:
    """The OMA API as an operator's script uses it."""

    def __init__(self, http: httpx.AsyncClient, base: str) -> None:
        self.http = http
        self.base = f"{base}/api/v1"
        self.headers: dict[str, str] = {}

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        r = await self.http.request(method, f"{self.base}{path}", json=body, headers=self.headers, **kw)
        if not r.is_success:
            raise RuntimeError(f"{method} {path}: HTTP {r.status_code}: {r.text[:500]}")
        return r.json()


async def enroll_vma(api: Api) -> tuple[str, str]:
    """The VMA's enrollment, step by step: pairing code, key proof, approval, one-time secret."""
    code = (await api.call("POST", "/admin/vma/pairing-code", {}))["pairing_code"]
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    e = await api.call(
        "POST",
        "/vma/enroll",
        {
            "pairing_code": code,
            "vma_public_key": public.decode(),
            "vma_name": "vma-demo",
            "vma_version": "demo",
            "vma_fingerprint": "SHA256:demo",
        },
    )
    signature = base64.b64encode(key.sign(e["challenge"].encode())).decode()
    proof = {"enrollment_id": e["enrollment_id"], "signature": signature}
    await api.call("POST", "/vma/enroll/verify", proof)
    await api.call("POST", f"/admin/vma/approve/{e['enrollment_id']}", {})
    result = await api.call("GET", "/vma/enroll/result", params=proof)
    return str(result["appliance_id"]), str(result["secret"])


def progress_line(vm: str, kind: str, p: dict[str, Any], started: float) -> str:
    rate = p.get("throughput_bps") or 0
    return (
        f"  {vm:<6} {kind:<11} {p.get('status', ''):<11} {p.get('progress_percent') or 0:6.1f}%"
        f"  {iec_size(p.get('bytes_transferred') or 0):>9} / {iec_size(p.get('total_bytes') or 0):<9}"
        f"  {iec_size(rate) + '/s':>11}  {time.monotonic() - started:5.1f} s"
        f"  {p.get('current_operation') or ''}"
    )


async def run_pass(api: Api, vms: list[LabVM], kind: str) -> list[PassResult]:
    """One replication per VM, created at once (they run side by side); progress lines until all end."""
    jobs: dict[str, tuple[LabVM, float]] = {}
    for vm in vms:
        job = await api.call(
            "POST",
            "/replications",
            {"source_vm": {"name": vm.name, "path": f"/DC0/vm/{vm.name}", "id": vm.moref}},
        )
        if job["replication_type"] != kind:
            raise RuntimeError(
                f"{vm.name}: expected an {kind} replication, the OMA made {job['replication_type']}"
            )
        jobs[job["id"]] = (vm, time.monotonic())
    results: dict[str, PassResult] = {}
    last_print = 0.0
    while len(results) < len(jobs):
        lines = []
        for job_id, (vm, started) in jobs.items():
            if job_id in results:
                continue
            p = await api.call("GET", f"/replications/{job_id}/progress")
            lines.append(progress_line(vm.name, kind, p, started))
            if p["status"] in TERMINAL:
                job = await api.call("GET", f"/replications/{job_id}")
                results[job_id] = PassResult(
                    vm.name,
                    kind,
                    time.monotonic() - started,
                    job["bytes_transferred"],
                    job["disks"],
                    job["status"],
                    job["error_message"],
                )
        if time.monotonic() - last_print >= 1.0 or len(results) == len(jobs):
            last_print = time.monotonic()
            print("\n".join(lines), flush=True)
        await trio.sleep(0.25)
    # the engine records the VMA's per-disk figures as it closes the job's exports, just after the end
    for job_id, r in results.items():
        with trio.move_on_after(10):
            while r.status == "completed" and any(d["copy_mode"] is None for d in r.disks):
                await trio.sleep(0.1)
                r.disks = (await api.call("GET", f"/replications/{job_id}"))["disks"]
    return [results[job_id] for job_id in jobs]  # in the VMs' order, whichever ended first


async def start_cloudstack(work: Path) -> tuple[trio.Process, str]:
    """The lab CloudStack as its own process on a free loopback port: the process and its API URL
    (once it printed it)."""
    cmd = [
        sys.executable,
        *("-m", "lab.cloudstack", "--port", "0", "--data-dir", str(work / "cloudstack")),
        *("--device-root", str(work / "cloudstack" / "dev"), "--oma-vm-mac", OMA_VM_MAC),
        *("--api-key", CLOUDSTACK_API_KEY, "--secret-key", CLOUDSTACK_SECRET_KEY, "--job-delay", "0.1"),
    ]
    with (work / "cloudstack.log").open("wb") as log_file:
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=log_file)
    assert proc.stdout is not None
    line = b""
    with trio.fail_after(60):
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(1)
            if not chunk:
                raise RuntimeError(f"the lab CloudStack exited: see {work / 'cloudstack.log'}")
            line += chunk
    text = line.decode().strip()
    if not text.startswith(CLOUDSTACK_READY):
        raise RuntimeError(f"the lab CloudStack said {text!r}")
    return proc, text.removeprefix(CLOUDSTACK_READY)


async def configure_cloudstack(api: Api, api_url: str, vms: list[LabVM]) -> dict[str, Any]:
    """CloudStack through the OMA's API, as an operator sets it up: discover, save (the OMA VM
    detected by its MAC), validate, and map each VM's network. Returns the saved settings."""
    login = {"api_url": api_url, "api_key": CLOUDSTACK_API_KEY, "secret_key": CLOUDSTACK_SECRET_KEY}
    found = await api.call("POST", "/settings/cloudstack/discover-all", login)
    zone = next(z for z in found["zones"] if z["name"] == CLOUDSTACK_ZONE)
    disk = next(o for o in found["disk_offerings"] if o["is_customized"])
    saved = await api.call(
        "POST",
        "/ossea/config-streamlined",
        {
            "base_url": api_url.removesuffix("/client/api"),
            "api_key": CLOUDSTACK_API_KEY,
            "secret_key": CLOUDSTACK_SECRET_KEY,
            "zone_id": zone["id"],
            "disk_offering_id": disk["id"],
        },
    )
    checks = await api.call("POST", "/settings/cloudstack/validate", {})
    if not checks["success"]:
        raise RuntimeError(f"CloudStack settings are not ready: {checks}")
    network = (await api.call("POST", "/networks/resolve", {"network_name": CLOUDSTACK_NETWORK}))["networks"][
        0
    ]
    for vm in vms:
        await api.call(
            "POST",
            "/network-mappings",
            {
                "vm_id": vm.moref,
                "source_network_name": "VM Network",
                "destination_network_id": network["network_id"],
            },
        )
    config: dict[str, Any] = saved["config"]
    print(
        f"           zone {zone['name']}, disk offering {disk['name']} (custom size),"
        f" OMA VM {config['oma_vm_id']}; VM Network -> {CLOUDSTACK_NETWORK} for {len(vms)} VMs"
    )
    return config


async def cloudstack_report(
    http: httpx.AsyncClient, api_url: str, full: list[PassResult], incremental: list[PassResult]
) -> dict[str, Any]:
    """The CloudStack part of the summary: each replica volume as CloudStack has it, whether both
    passes wrote into it and whether it equals its source."""
    r = await http.get(f"{api_url.removesuffix('/client/api')}/lab/state")
    r.raise_for_status()
    in_cloud = {v["id"]: v for v in r.json()["volumes"]}
    volumes = []
    for f, i in zip(full, incremental, strict=True):
        by_disk = {d["disk_id"]: d for d in i.disks}
        for d in f.disks:
            volume_id = d.get("cloudstack_volume_id")
            held = in_cloud.get(volume_id or "", {})
            volumes.append(
                {
                    "vm": f.vm,
                    "disk_id": d["disk_id"],
                    "cloudstack_volume_id": volume_id,
                    "size_bytes": held.get("size"),
                    "attached_to": held.get("virtualmachineid"),
                    "device": d["volume_path"],
                    "same_volume_both_passes": bool(volume_id)
                    and by_disk[d["disk_id"]].get("cloudstack_volume_id") == volume_id,
                    "target_equals_source": f.equal.get(d["disk_id"], False)
                    and i.equal.get(d["disk_id"], False),
                }
            )
    return {"volumes_created": len(volumes), "volumes": volumes}


def print_cloudstack(section: dict[str, Any]) -> None:
    print(f"\nCloudStack volumes made: {section['volumes_created']}")
    for v in section["volumes"]:
        print(
            f"  {v['vm']:<6} {v['disk_id']:<10} {v['cloudstack_volume_id']}"
            f" {iec_size(v['size_bytes'] or 0):>9} attached to {v['attached_to']}"
            f"  same volume both passes: {'yes' if v['same_volume_both_passes'] else 'NO'}"
            f"  equal to source: {'yes' if v['target_equals_source'] else 'NO'}"
        )


def images_equal(a: Path, b: Path) -> bool:
    r = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)], check=False)
    return r.returncode == 0


def count_snapshots(lab: Lab, vms: list[LabVM]) -> int:
    """Snapshots of the VMs in vCenter (the VMA removes its own after each pass)."""
    pin = lab.thumbprint()
    vs = VSphere.connect(
        VCenterLogin(lab.url, lab.username, lab.password, tls_mode="thumbprint", tls_thumbprint=pin)
    )
    try:
        return sum(len(vs.snapshot_tree(vs.find_vm(f"/DC0/vm/{vm.name}"))) for vm in vms)
    finally:
        vs.disconnect()


def verify(results: list[PassResult], vms: list[LabVM]) -> None:
    images = {(vm.name, f"disk-{d.key}"): d.image for vm in vms for d in vm.disks}
    for r in results:
        for d in r.disks:
            r.equal[d["disk_id"]] = bool(d["volume_path"]) and images_equal(
                Path(d["volume_path"]), images[(r.vm, d["disk_id"])]
            )


def print_summary(
    full: list[PassResult], incremental: list[PassResult], vms: list[LabVM], snapshots: int
) -> None:
    capacity = {(vm.name, f"disk-{d.key}"): d.capacity for vm in vms for d in vm.disks}
    print()
    header = (
        f"{'VM':<6} {'disk':<10} {'size':>9}  {'full pass':>10} {'incremental':>12}  "
        f"{'full: time, rate':>20}  {'incr.: time, rate':>20}  target == source"
    )
    print(header)
    print("-" * len(header))
    for f, i in zip(full, incremental, strict=True):
        by_disk = {d["disk_id"]: d for d in i.disks}
        for n, d in enumerate(f.disks):
            di = by_disk[d["disk_id"]]
            timing = ("", "")
            if n == 0:
                timing = (
                    f"{f.seconds:5.1f} s {iec_size(f.bytes_written / max(f.seconds, 1e-9)) + '/s':>10}",
                    f"{i.seconds:5.1f} s {iec_size(i.bytes_written / max(i.seconds, 1e-9)) + '/s':>10}",
                )
            ok = "yes" if f.equal.get(d["disk_id"]) and i.equal.get(d["disk_id"]) else "NO"
            print(
                f"{f.vm if n == 0 else '':<6} {d['disk_id']:<10}"
                f" {iec_size(capacity[(f.vm, d['disk_id'])]):>9}  "
                f"{iec_size(d['bytes_written'] or 0):>10} {iec_size(di['bytes_written'] or 0):>12}  "
                f"{timing[0]:>20}  {timing[1]:>20}  {ok}"
            )
    total_full = sum(r.bytes_written for r in full)
    total_incr = sum(r.bytes_written for r in incremental)
    disk_total = sum(capacity.values())
    print("-" * len(header))
    print(
        f"{len(vms)} VMs, {len(capacity)} disks, {iec_size(disk_total)} of disks: the full pass moved"
        f" {iec_size(total_full)} of data (the rest was zeroed, never sent),"
        f" the incremental {iec_size(total_incr)}"
        f" ({total_incr / disk_total:.2%} of the disks)"
    )
    print(f"snapshots left in vCenter: {snapshots}")


def replication_report(
    full: list[PassResult], incremental: list[PassResult], vms: list[LabVM], snapshots: int
) -> dict[str, Any]:
    """The replication part of the ``--json`` summary: every pass, per disk."""
    capacity = {(vm.name, f"disk-{d.key}"): d.capacity for vm in vms for d in vm.disks}
    return {
        "passes": [
            {
                "vm": r.vm,
                "kind": r.kind,
                "status": r.status,
                "error": r.error,
                "seconds": round(r.seconds, 3),
                "bytes_transferred": r.bytes_transferred,
                "disks": [
                    {
                        "disk_id": d["disk_id"],
                        "capacity_bytes": capacity[(r.vm, d["disk_id"])],
                        "copy_mode": d.get("copy_mode"),
                        "bytes_written": d["bytes_written"] or 0,
                        "bytes_zeroed": d.get("bytes_zeroed") or 0,
                        "target_equals_source": r.equal.get(d["disk_id"], False),
                    }
                    for d in r.disks
                ],
            }
            for r in full + incremental
        ],
        "snapshots_left": snapshots,
    }


async def wait_backup(api: Api, backup_id: str, within: float = 300.0) -> dict[str, Any]:
    with trio.fail_after(within):
        while True:
            point: dict[str, Any] = await api.call("GET", f"/backup/{backup_id}")
            if point["status"] in TERMINAL:
                return point
            await trio.sleep(0.2)


async def restored_equal(api: Api, backup_id: str, tree: dict[str, bytes]) -> tuple[int, bool]:
    """Open the point for file-level restore and download every file of ``tree`` from it: how
    many files, and whether all equal what the guest had (and nothing else is there)."""
    mount = await api.call("POST", "/restore/mount", {"backup_id": backup_id})
    mount_id = mount["mount_id"]
    try:
        listing = await api.call(
            "GET", f"/restore/{mount_id}/files", params={"path": "/", "recursive": "true"}
        )
        found = {f["path"].lstrip("/") for f in listing["files"] if f["type"] == "file"}
        same = {p for p in found if not p.startswith("lost+found")} == set(tree)
        for path, data in tree.items():
            r = await api.http.get(
                f"{api.base}/restore/{mount_id}/download", params={"path": f"/{path}"}, headers=api.headers
            )
            same = same and r.status_code == 200 and r.content == data
        return len(tree), same
    finally:
        await api.call("DELETE", f"/restore/{mount_id}")


async def backup_part(api: Api, vm: LabVM, work: Path, t0: float, report: dict[str, Any]) -> bool:
    """A full and an incremental backup of ``vm``'s data disk, file-level restore from both."""
    disk = vm.disks[1]
    disk_id = f"disk-{disk.key}"
    first = random_files("data", 24, 2 * MiB, 2)
    # The guest rewrites two files in place (same sizes: the file system keeps its layout).
    second = dict(first)
    second["etc/hostname"] = b"DATA\n"
    second["srv/data/blob-001.bin"] = random.Random(4).randbytes(len(first["srv/data/blob-001.bin"]))
    print(
        f"\n[{time.monotonic() - t0:5.1f} s] backups of {vm.name} {disk_id} into a local repository",
        flush=True,
    )
    repo = await api.call(
        "POST",
        "/repositories",
        {"name": "demo", "type": "local", "config": {"disk_path": str(work / "backups")}},
    )
    rows = []
    ok = True
    for kind, tree in (("full", first), ("incremental", second)):
        # The guest (re)writes its files: only the blocks that differ reach the disk (and CBT).
        await trio.to_thread.run_sync(rewrite_partition, disk.guest, disk.layout, 1, tree)
        started = time.monotonic()
        body = {"vm_name": vm.name, "disk_id": disk_id, "backup_type": kind, "repository_id": repo["id"]}
        point = await wait_backup(api, (await api.call("POST", "/backup/start", body))["backup_id"])
        seconds = time.monotonic() - started
        if point["status"] != "completed":
            print(f"           {kind} backup {point['status']}: {point['error_message']}")
            return False
        files, same = await restored_equal(api, point["backup_id"], tree)
        ok = ok and same
        rows.append((point, seconds, files, same))
    verified = await api.call("POST", f"/backup/{rows[-1][0]['backup_id']}/verify")
    ok = ok and bool(verified["ok"])
    report["backup"] = {
        "vm": vm.name,
        "disk_id": disk_id,
        "points": [
            {
                "backup_id": point["backup_id"],
                "backup_type": point["backup_type"],
                "status": point["status"],
                "changed_bytes": point["changed_bytes"] or 0,
                "stored_bytes": point["stored_bytes"] or 0,
                "seconds": round(seconds, 3),
                "files_restored": files,
                "files_equal": same,
                "disk_digest": point["disk_digest"],
            }
            for point, seconds, files, same in rows
        ],
        "chain_verified": bool(verified["ok"]),
    }
    header = f"{'point':<12} {'changed':>9} {'stored':>9} {'time':>7}  {'files restored':>14}  digest"
    print(header)
    print("-" * len(header))
    for point, seconds, files, same in rows:
        print(
            f"{point['backup_type']:<12} {iec_size(point['changed_bytes'] or 0):>9}"
            f" {iec_size(point['stored_bytes'] or 0):>9} {seconds:5.1f} s"
            f"  {files:>5} {'equal' if same else 'DIFFER':>8}  {point['disk_digest'][:16]}"
        )
    print(
        f"chain verified against its manifests: {'yes' if verified['ok'] else 'NO'}"
        f" ({sum(len(r['files']) for r in verified['replicas'])} QCOW2 files)"
    )
    return ok


async def demo(work: Path, quiet_logs: bool, report: dict[str, Any]) -> bool:
    """The whole demo; ``report`` receives the summary (``--json``)."""
    t0 = time.monotonic()
    ok = False
    log_file = work / "services.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    if not quiet_logs:
        logging.getLogger().addHandler(logging.StreamHandler(sys.stderr))

    print(
        f"[{time.monotonic() - t0:5.1f} s] starting the vSphere lab and building its VMs' disks ...",
        flush=True,
    )
    lab = Lab(work / "lab", qcda_window=64 * MiB, tls=True)  # HTTPS, its certificate pinned below
    await trio.to_thread.run_sync(lab.start)
    cloudstack: trio.Process | None = None
    try:
        vms = await trio.to_thread.run_sync(build_lab_vms, lab)
        for vm in vms:
            sizes = ", ".join(iec_size(d.capacity) for d in vm.disks)
            print(f"           {vm.name}: {len(vm.disks)} disk(s) of {sizes}", flush=True)

        admin_password = secrets.token_urlsafe(16)
        vma_port = free_tcp_port()
        oma_config = OmaConfig(
            data_dir=work / "oma",
            host="127.0.0.1",
            port=0,
            vma_url=f"http://127.0.0.1:{vma_port}",
            # Where the VMA's enrollment secret lands (below): the OMA signs its VMA requests with it.
            vma_secret_file=work / "vma" / "oma.secret",
            admin_username="admin",
            admin_password=admin_password,
            db_pool_size=10,
            engine_poll_interval=0.25,
            # the lab CloudStack's OMA VM: its MAC, and where its volumes' devices appear
            oma_vm_macs=(OMA_VM_MAC,),
            device_root=work / "cloudstack" / "dev",
        )
        print(f"[{time.monotonic() - t0:5.1f} s] starting the lab CloudStack ...", flush=True)
        cloudstack, cloudstack_url = await start_cloudstack(work)
        print(f"           CloudStack API at {cloudstack_url}", flush=True)
        print(
            f"[{time.monotonic() - t0:5.1f} s] starting the OMA (embedded PostgreSQL in {work / 'oma'}) ..."
        )
        hc = HypercornConfig()
        hc.bind = ["127.0.0.1:0"]
        hc.accesslog = None
        hc.errorlog = None
        stop_oma = trio.Event()
        async with trio.open_nursery() as nursery:
            app = create_app(oma_config)
            binds: list[str] = await nursery.start(
                lambda task_status: serve(app, hc, shutdown_trigger=stop_oma.wait, task_status=task_status)
            )
            oma_url = binds[0]
            vma_scope = trio.CancelScope()
            try:
                async with httpx.AsyncClient(timeout=60, trust_env=False) as http:
                    api = Api(http, oma_url)
                    token = (
                        await api.call(
                            "POST", "/auth/login", {"username": "admin", "password": admin_password}
                        )
                    )["token"]
                    api.headers = {"Authorization": f"Bearer {token}"}
                    print(
                        f"[{time.monotonic() - t0:5.1f} s] OMA at {oma_url}; enrolling the VMA ...",
                        flush=True,
                    )
                    appliance_id, secret = await enroll_vma(api)
                    secret_file = oma_config.vma_secret_file
                    assert secret_file is not None
                    secret_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                    secret_file.write_text(secret + "\n")
                    secret_file.chmod(0o600)
                    vma_config = VmaConfig(
                        host="127.0.0.1",
                        port=vma_port,
                        work_dir=work / "vma" / "work",
                        oma_url=oma_url,
                        appliance_id=appliance_id,
                        oma_secret_file=secret_file,
                        source="file",
                        datastore_roots=dict(lab.datastores.dirs),
                        progress_report_interval=0.5,
                    )

                    async def run_vma(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
                        with vma_scope:
                            await serve_vma(vma_config, handle_signals=False, task_status=task_status)

                    vma_url: str = await nursery.start(run_vma)
                    print(f"[{time.monotonic() - t0:5.1f} s] VMA {appliance_id} at {vma_url}", flush=True)
                    await api.call(
                        "POST",
                        "/vmware-credentials",
                        {
                            "credential_name": "lab-vcenter",
                            "vcenter_host": lab.url,
                            "username": lab.username,
                            "password": lab.password,
                            "datacenter": "DC0",
                            "is_default": True,
                            "tls_mode": "thumbprint",
                            "tls_thumbprint": lab.thumbprint(),
                        },
                    )
                    found = await api.call("POST", "/discovery/discover-vms", {"create_context": True})
                    print(f"[{time.monotonic() - t0:5.1f} s] discovered through the OMA:", flush=True)
                    for vm in found["discovered_vms"]:
                        disks = ", ".join(f"{d['id']} {iec_size(d['capacity_bytes'])}" for d in vm["disks"])
                        print(f"           {vm['name']:<6} {vm['path']:<16} {vm['power_state']:<10} {disks}")
                    print(
                        f"[{time.monotonic() - t0:5.1f} s] configuring CloudStack through the OMA's API ...",
                        flush=True,
                    )
                    await configure_cloudstack(api, cloudstack_url, vms)

                    print(
                        f"\n[{time.monotonic() - t0:5.1f} s] pass 1: full replication of {len(vms)} VMs",
                        flush=True,
                    )
                    full = await run_pass(api, vms, "initial")
                    await trio.to_thread.run_sync(verify, full, vms)

                    print(f"\n[{time.monotonic() - t0:5.1f} s] the guests write ...", flush=True)
                    changed = 0
                    for n, vm in enumerate(vms):
                        for k, d in enumerate(vm.disks):
                            chunks = max(2, d.capacity // MiB // 20)  # ~5% of the disk in 1 MiB chunks
                            rewrite = partial(
                                d.guest.rewrite_random_chunks, chunks, chunk=MiB, seed=10 * n + k
                            )
                            areas = await trio.to_thread.run_sync(rewrite)
                            changed += sum(length for _, length in areas)
                    disk_count = sum(len(vm.disks) for vm in vms)
                    print(f"           {iec_size(changed)} rewritten over {disk_count} disks")

                    print(f"\n[{time.monotonic() - t0:5.1f} s] pass 2: incremental replication", flush=True)
                    incremental = await run_pass(api, vms, "incremental")
                    await trio.to_thread.run_sync(verify, incremental, vms)
                    snapshots = await trio.to_thread.run_sync(count_snapshots, lab, vms)

                    print_summary(full, incremental, vms, snapshots)
                    report["replication"] = replication_report(full, incremental, vms, snapshots)
                    report["cloudstack"] = await cloudstack_report(http, cloudstack_url, full, incremental)
                    print_cloudstack(report["cloudstack"])
                    ok = (
                        all(
                            r.status == "completed" and r.equal and all(r.equal.values())
                            for r in full + incremental
                        )
                        and snapshots == 0
                        and all(
                            v["same_volume_both_passes"] and v["target_equals_source"]
                            for v in report["cloudstack"]["volumes"]
                        )
                    )
                    for r in full + incremental:
                        if r.status != "completed":
                            print(f"{r.vm} {r.kind}: {r.status}: {r.error}")
                    ok = await backup_part(api, vms[0], work, t0, report) and ok
            except Exception:
                traceback.print_exc()  # then shut the services down in order, and report a failure
            finally:
                stop_oma.set()
                vma_scope.cancel()
    finally:
        if cloudstack is not None:
            with trio.CancelScope(shield=True):
                await aterminate(cloudstack)
        await trio.to_thread.run_sync(lab.stop)
    report["passed"], report["seconds"] = ok, round(time.monotonic() - t0, 3)
    print(f"\ndemo {'passed' if ok else 'FAILED'} in {time.monotonic() - t0:.1f} s")
    return ok


def write_json(path: Path, report: dict[str, Any]) -> None:
    """The summary as JSON: a new file, then renamed over ``path``."""
    path = path.resolve()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--workdir", type=Path, help="data directory of the demo (default: a temporary one, removed)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the data directory (volumes, database, logs)")
    ap.add_argument("--verbose", action="store_true", help="service logs on stderr too")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the summary as JSON to FILE")
    args = ap.parse_args(argv)
    # PostgreSQL run as root drops to its own user, which must traverse the data directory.
    work: Path = (args.workdir or Path(tempfile.mkdtemp(prefix="oma-demo-"))).resolve()
    if work.exists() and args.workdir is not None and any(work.iterdir()):
        print(f"{work} is not empty: give a new --workdir", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    # pgserver asks platformdirs for XDG_RUNTIME_DIR, unset on a server: not the demo's business
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    report: dict[str, Any] = {"passed": False}
    try:
        ok = trio.run(demo, work, not args.verbose, report)
        if args.json is not None:
            write_json(args.json, report)
    finally:
        if args.keep:
            print(f"kept in {work}: cloudstack (target volumes), backups, oma/pgdata, lab, services.log")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
