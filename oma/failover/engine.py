"""The failover engine: a job's steps in order, and the undo that follows a failure or ends a test.

Jobs run in the engine's nursery (started by the app, :meth:`FailoverEngine.run`). Each step is a
row written before it acts; each CloudStack change is recorded in the job's row before it is
made (and its id after), so :meth:`FailoverEngine._undo` works from the row alone: stop and
expunge the target VM (found by id, else by the name it was deployed with) after detaching the
replica volumes from it, delete the template ROOT it came with, revert each volume to its
snapshot (found by id, else by name) and delete the snapshot, and attach the volume to the OMA VM
again. Every part of the undo is idempotent, so an undo that failed (the job ends
``cleanup_required``) or was interrupted can run again. At start the engine undoes the jobs a
stopped OMA left running (a failover is not resumed half-way: rolled back, it can be retried).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from oma.cloudstack.client import CloudStackClient
from oma.cloudstack.network_mappings import resolve_vm
from oma.cloudstack.settings import StoredSettings, active_client
from oma.cloudstack.volumes import OmaVmLock, OmaVmVolumes
from oma.config import OmaConfig
from oma.crypto import SecretBox
from oma.failover import cloud, drivers, jobs
from oma.failover.checks import CONTEXT_COLUMNS, readiness
from oma.failover.guest import GuestCheck
from oma.failover.jobs import JobVolume
from pyapp.api import ApiError
from pyapp.db import Database

log = logging.getLogger(__name__)

Step = Callable[[dict[str, Any], CloudStackClient, StoredSettings], Awaitable[dict[str, Any]]]
NOT_RUNNING = "FAILOVER_ENGINE_NOT_RUNNING"


def error_text(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return exc.message
    return str(exc) or type(exc).__name__


class FailoverEngine:
    def __init__(
        self,
        config: OmaConfig,
        db: Database,
        box: SecretBox,
        lock: OmaVmLock,
        guest_check: GuestCheck,
        *,
        boot_timeout: float,
    ) -> None:
        self.config = config
        self.db = db
        self.box = box
        self.lock = lock
        self.guest_check = guest_check
        self.boot_timeout = boot_timeout
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self.stopped = trio.Event()
        #: Jobs this process is driving now.
        self.jobs: set[str] = set()

    async def run(self) -> None:
        """Undo what a stopped OMA left, then drive jobs until :meth:`stop`."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for job_id in await jobs.unfinished(self.db):
                    job = await jobs.load_job(self.db, job_id)
                    end = job["status"] == jobs.ENDING
                    reason = None if end else "the OMA stopped during the failover: rolled back"
                    self._spawn(job_id, self._undo, job_id, end, reason)
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self.stopped.set()

    def stop(self) -> None:
        self._stop.set()

    def _spawn(self, job_id: str, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        if self._nursery is None:
            raise ApiError(503, NOT_RUNNING, "the failover engine is not running on this OMA")

        async def drive() -> None:
            self.jobs.add(job_id)
            try:
                await fn(*args)
            finally:
                self.jobs.discard(job_id)

        self._nursery.start_soon(drive)

    async def context(self, vm: str) -> dict[str, Any]:
        found = await resolve_vm(self.db, vm)
        row = await self.db.fetchrow(
            f"SELECT {CONTEXT_COLUMNS} FROM vm_contexts WHERE context_id = $1", found["context_id"]
        )
        assert row is not None
        return dict(row.items())

    async def readiness(self, vm: str) -> dict[str, Any]:
        context = await self.context(vm)
        async with active_client(self.db, self.box, self.config) as (client, stored):
            found = await readiness(self.db, client, stored, context)
        return {"vm_context_id": context["context_id"], "vm_name": context["vm_name"], **found.describe()}

    # -- the test failover -------------------------------------------------------------------

    async def start_test(self, vm: str, created_by: str) -> dict[str, Any]:
        """A new test failover job of ``vm`` (a context id, VMware id or name), running."""
        if self._nursery is None:
            raise ApiError(503, NOT_RUNNING, "the failover engine is not running on this OMA")
        context = await self.context(vm)
        job = await jobs.create_job(self.db, context, jobs.TEST, created_by, [])
        self._spawn(job["id"], self._run_test, job["id"])
        return job

    async def _run_test(self, job_id: str) -> None:
        steps: list[tuple[str, Step]] = [
            ("validate", self._validate),
            ("snapshot", self._snapshot),
            ("prepare", self._prepare),
            ("deploy", self._deploy),
            ("start", self._start),
        ]
        try:
            async with active_client(self.db, self.box, self.config) as (client, stored):
                for name, step in steps:
                    seq = await jobs.begin_step(self.db, job_id, name)
                    try:
                        result = await step(await jobs.load_job(self.db, job_id), client, stored)
                    except Exception as exc:
                        log.warning(
                            "failover step %s failed: %s",
                            name,
                            error_text(exc),
                            extra={"action": "failover_step", "job_id": job_id},
                        )
                        await jobs.end_step(self.db, job_id, seq, "failed", {}, error_text(exc))
                        await self._undo(job_id, False, f"{name}: {error_text(exc)}")
                        return
                    await jobs.end_step(self.db, job_id, seq, "completed", result)
        except ApiError as exc:  # the settings went away before the first step
            await self._undo(job_id, False, error_text(exc))
            return
        job = await jobs.load_job(self.db, job_id)
        await jobs.finish_job(self.db, job, jobs.FAILED_OVER, jobs.FAILED_OVER_TEST)
        log.info("test failover running", extra={"action": "failover_test", "job_id": job_id})

    async def _validate(
        self, job: dict[str, Any], client: CloudStackClient, stored: StoredSettings
    ) -> dict[str, Any]:
        context = await self.context(job["vm_context_id"])
        found = await readiness(self.db, client, stored, context, jobs.TEST, own_job=job["id"])
        if not found.ready:
            raise ApiError.unprocessable(f"the VM is not ready to fail over: {found.failures()}")
        volumes = [
            JobVolume(v.disk_id, v.replica_volume_id, v.cloudstack_volume_id, f"{job['id']}-{v.disk_id}")
            for v in found.volumes
        ]
        await jobs.update_job(self.db, job["id"], volumes=volumes)
        return found.describe()

    def _oma_volumes(self, client: CloudStackClient, stored: StoredSettings) -> OmaVmVolumes:
        return OmaVmVolumes.from_config(client, self.lock, stored.resources.oma_vm_id, self.config)

    async def _snapshot(
        self, job: dict[str, Any], client: CloudStackClient, stored: StoredSettings
    ) -> dict[str, Any]:
        volumes = jobs.job_volumes(job)
        oma = self._oma_volumes(client, stored)
        for v in volumes:
            v.detached_from_oma = True
            await jobs.update_job(self.db, job["id"], volumes=volumes)
            await oma.detach(v.cloudstack_volume_id)
            v.snapshot_id = await cloud.snapshot(client, v.cloudstack_volume_id, v.snapshot_name)
            await jobs.update_job(self.db, job["id"], volumes=volumes)
        return {"snapshots": {v.disk_id: v.snapshot_id for v in volumes}}

    async def _prepare(
        self, job: dict[str, Any], client: CloudStackClient, stored: StoredSettings
    ) -> dict[str, Any]:
        """Read the guest through the OMA VM (the volumes attached there for the time of it)."""
        volumes = jobs.job_volumes(job)
        oma = self._oma_volumes(client, stored)
        devices: list[Path] = []
        for v in volumes:
            devices.append((await oma.attach(v.cloudstack_volume_id)).device)
        try:
            found = await trio.to_thread.run_sync(drivers.inspect_disks, devices)
            result = found.describe()
            if not found.has_virtio:
                result["conversion"] = await trio.to_thread.run_sync(drivers.convert, devices[0])
        finally:
            with trio.CancelScope(shield=True):
                for v in volumes:
                    await oma.detach(v.cloudstack_volume_id)
        return result

    async def _deploy(
        self, job: dict[str, Any], client: CloudStackClient, stored: StoredSettings
    ) -> dict[str, Any]:
        validated = await self._step_result(job["id"], "validate")
        volumes = jobs.job_volumes(job)
        vm = await cloud.deploy_stopped(
            client,
            name=job["target_vm_name"],
            display_name=f"{job['vm_name']} (test failover)",
            zone_id=stored.resources.zone_id,
            offering_id=validated["service_offering"]["id"],
            template_id=stored.resources.template_id,
            network_ids=validated["network_ids"],
        )
        vm_id = str(vm["id"])
        await jobs.update_job(self.db, job["id"], target_vm_id=vm_id)
        roots = [v for v in await cloud.volumes_of(client, vm_id) if v.get("type") == "ROOT"]
        template_root = str(roots[0]["id"]) if roots else None
        if template_root is not None:
            await jobs.update_job(self.db, job["id"], template_root_id=template_root)
            await client.job("detachVolume", id=template_root)
        for device_id, v in enumerate(volumes):
            v.attached_to_target = True
            await jobs.update_job(self.db, job["id"], volumes=volumes)
            await cloud.attach(client, v.cloudstack_volume_id, vm_id, 0 if device_id == 0 else None)
        if template_root is not None:
            await cloud.delete_volume(client, template_root)
            await jobs.update_job(self.db, job["id"], template_root_deleted=True)
        return {
            "target_vm_id": vm_id,
            "template_root_id": template_root,
            "macs": [n.get("macaddress") for n in vm.get("nic") or []],
            "networks": [n.get("networkid") for n in vm.get("nic") or []],
        }

    async def _start(
        self, job: dict[str, Any], client: CloudStackClient, stored: StoredSettings
    ) -> dict[str, Any]:
        vm_id = job["target_vm_id"]
        began = time.monotonic()
        await cloud.start(client, vm_id)
        await cloud.wait_running(client, vm_id, self.boot_timeout)
        running = time.monotonic() - began
        answer = await self.guest_check(stored.login.api_url, vm_id, self.boot_timeout)
        return {
            **answer,
            "seconds_to_running": round(running, 3),
            "seconds_to_answer": round(time.monotonic() - began, 3),
        }

    async def _step_result(self, job_id: str, name: str) -> dict[str, Any]:
        for step in reversed(await jobs.steps(self.db, job_id)):
            if step["name"] == name and step["status"] == "completed":
                result: dict[str, Any] = step["result"]
                return result
        raise RuntimeError(f"job {job_id} has no completed {name} step")

    # -- ending a test, rolling back -------------------------------------------------------

    async def end_test(self, job_id: str) -> dict[str, Any]:
        """End a running test failover (``DELETE /failover/test/{job_id}``)."""
        if self._nursery is None:
            raise ApiError(503, NOT_RUNNING, "the failover engine is not running on this OMA")
        async with self.db.transaction() as conn:
            row = await conn.fetchrow(
                "SELECT failover_type, status FROM failover_jobs WHERE id = $1 FOR UPDATE", job_id
            )
            if row is None:
                raise ApiError.not_found(f"failover job {job_id} not found")
            if row["failover_type"] != jobs.TEST:
                raise ApiError.conflict(f"failover job {job_id} is a live failover, not a test")
            if row["status"] not in (jobs.FAILED_OVER, jobs.CLEANUP_REQUIRED):
                raise ApiError.conflict(f"failover job {job_id} is {row['status']}: only a running test ends")
            await conn.execute(
                "UPDATE failover_jobs SET status = 'ending', updated_at = now() WHERE id = $1", job_id
            )
        job = await jobs.load_job(self.db, job_id)
        await jobs.set_context_status(self.db, job["vm_context_id"], jobs.ENDING_TEST)
        self._spawn(job_id, self._undo, job_id, True, None)
        return job

    async def _undo(self, job_id: str, end: bool, error: str | None) -> None:
        """Undo what the job did (module doc): ``end`` a test, or roll back after ``error``."""
        name = "end_test" if end else "rollback"
        if not end:
            await jobs.update_job(self.db, job_id, status=jobs.ROLLING_BACK, error_message=error)
        seq = await jobs.begin_step(self.db, job_id, name)
        job = await jobs.load_job(self.db, job_id)
        try:
            with trio.CancelScope(shield=True):  # an undo under way is finished, not abandoned
                async with active_client(self.db, self.box, self.config) as (client, stored):
                    result = await self._undo_in(job, client, stored)
        except Exception as exc:
            text = error_text(exc)
            log.error("failover undo failed: %s", text, extra={"action": "failover_undo", "job_id": job_id})
            await jobs.end_step(self.db, job_id, seq, "failed", {}, text)
            why = f"{error}; then the undo failed: {text}" if error else f"ending the test failed: {text}"
            await jobs.finish_job(self.db, job, jobs.CLEANUP_REQUIRED, jobs.CONTEXT_CLEANUP_REQUIRED, why)
            return
        await jobs.end_step(self.db, job_id, seq, "completed", result)
        if end:
            await jobs.finish_job(self.db, job, jobs.ENDED, jobs.READY_FOR_FAILOVER)
        else:
            back = job["previous_vm_status"] or jobs.READY_FOR_FAILOVER
            await jobs.finish_job(self.db, job, jobs.FAILED, back, error)

    async def _undo_in(
        self, job: dict[str, Any], client: CloudStackClient, stored: StoredSettings
    ) -> dict[str, Any]:
        volumes = jobs.job_volumes(job)
        done: dict[str, Any] = {
            "vm_expunged": None,
            "reverted": [],
            "snapshots_deleted": [],
            "reattached": [],
        }
        vm = await cloud.find_vm(client, vm_id=job["target_vm_id"], name=job["target_vm_name"])
        if vm is not None:
            vm_id = str(vm["id"])
            if vm.get("state") not in ("Stopped", "Error"):
                await cloud.stop(client, vm_id)
            for v in reversed(volumes):  # the replicas leave before the VM is expunged
                await cloud.detach_from(client, v.cloudstack_volume_id, vm_id)
            await cloud.expunge(client, vm_id)
            done["vm_expunged"] = vm_id
        if job["template_root_id"] and not job["template_root_deleted"]:
            await cloud.delete_volume(client, job["template_root_id"])
        oma = self._oma_volumes(client, stored)
        for v in volumes:
            snapshot_id = v.snapshot_id or await cloud.find_snapshot(
                client, v.cloudstack_volume_id, v.snapshot_name
            )
            if snapshot_id is not None:
                await oma.detach(v.cloudstack_volume_id)  # a revert needs it off the running OMA VM
                await cloud.revert(client, snapshot_id)
                done["reverted"].append(v.disk_id)
                await cloud.delete_snapshot(client, snapshot_id)
                done["snapshots_deleted"].append(snapshot_id)
            if v.detached_from_oma:
                await oma.attach(v.cloudstack_volume_id)
                done["reattached"].append(v.disk_id)
        return done
