"""Replica volumes as CloudStack volumes on the OMA VM, against the lab CloudStack: create with the
offering and size, attach, the by-id device under the device root, detach, delete; one attach or
detach at a time, across tasks and OMA processes."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cloudstack_lab import (
    CUSTOM_DISK,
    GIB,
    ISOLATED,
    MEDIUM_SO,
    OMA_VM,
    SMALL_DISK,
    TEMPLATE,
    ZONE1,
    LabCloudStack,
    run_cloudstack_lab,
)

from oma.cloudstack.client import ClientOptions, CloudStackClient, Login
from oma.cloudstack.volumes import DEVICE_TIMEOUT, OmaVmLock, OmaVmVolumes, device_path, lock_key, size_gib
from pyapp.api import ApiError
from pyapp.db import Database, open_database

FAST = ClientOptions(backoff_initial=0.01, backoff_max=0.05, poll_initial=0.02, poll_max=0.05)


class RecordingClient(CloudStackClient):
    """Records when each attach or detach job ran, as the OMA saw it."""

    def __init__(self, login: Login, options: ClientOptions) -> None:
        super().__init__(login, options)
        self.spans: list[tuple[str, float, float]] = []

    async def job(self, command: str, **params: Any) -> dict[str, Any]:
        started = trio.current_time()
        try:
            return await super().job(command, **params)
        finally:
            if command in ("attachVolume", "detachVolume"):
                self.spans.append((command, started, trio.current_time()))


@pytest.fixture
async def db(oma_dsn: str) -> AsyncIterator[Database]:
    async with open_database(oma_dsn, min_size=1, max_size=4) as database:
        yield database


@asynccontextmanager
async def volumes_on(
    lab: LabCloudStack, db: Database, lock: OmaVmLock | None = None, device_timeout: float = 5
) -> AsyncIterator[OmaVmVolumes]:
    with RecordingClient(Login(lab.url, lab.api_key, lab.secret_key), FAST) as client:
        yield OmaVmVolumes(
            client,
            lock or OmaVmLock(db),
            vm_id=OMA_VM,
            device_root=lab.device_root,
            device_timeout=device_timeout,
        )


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[LabCloudStack]:
    async with run_cloudstack_lab(tmp_path / "cloudstack") as started:
        yield started


def test_device_names_and_sizes() -> None:
    volume = "6669f66b-dda4-40b3-9445-d029722ca9f4"
    assert device_path(Path("/dev"), volume) == Path("/dev/disk/by-id/virtio-6669f66bdda440b39445")
    assert [size_gib(n) for n in (1, GIB, GIB + 1, 3 * GIB)] == [1, 1, 2, 3]
    with pytest.raises(ValueError):
        size_gib(0)
    assert lock_key(OMA_VM) == lock_key(OMA_VM.upper()) and -(2**63) <= lock_key(OMA_VM) < 2**63


async def test_create_attach_find_detach_delete(lab: LabCloudStack, db: Database) -> None:
    async with volumes_on(lab, db) as ops:
        volume = await ops.create(
            name="vm~1 disk-1", size_bytes=3 * GIB + 1, disk_offering_id=CUSTOM_DISK, zone_id=ZONE1
        )
        assert volume.name == "vm-1 disk-1"  # '~' would be refused by CloudStack's signature check
        assert (volume.size_bytes, volume.disk_offering_id, volume.virtual_machine_id) == (
            4 * GIB,
            CUSTOM_DISK,
            None,
        )
        attached = await ops.attach(volume.id)
        assert attached.device == lab.link(volume.id) and attached.device.is_symlink()
        assert attached.device.resolve() == (lab.data_dir / "primary" / volume.id).resolve()
        assert attached.volume.virtual_machine_id == OMA_VM and attached.volume.device_id == 1
        assert [v.id for v in await ops.attached()] == [volume.id]
        with pytest.raises(ApiError) as caught:
            await ops.delete(volume.id)  # attached: refused before CloudStack is asked
        assert caught.value.status == 409 and "detach it first" in caught.value.message
        detached = await ops.detach(volume.id)
        assert detached.virtual_machine_id is None and not lab.link(volume.id).exists()
        await ops.delete(volume.id)
        with pytest.raises(ApiError) as caught:
            await ops.get(volume.id)
        assert caught.value.status == 404
    assert all(v["id"] != volume.id for v in (await lab.state())["volumes"])


async def test_a_fixed_size_offering_is_used_only_when_the_disk_fits(
    lab: LabCloudStack, db: Database
) -> None:
    async with volumes_on(lab, db) as ops:
        fits = await ops.create(name="fits", size_bytes=3 * GIB, disk_offering_id=SMALL_DISK, zone_id=ZONE1)
        assert fits.size_bytes == 5 * GIB
        with pytest.raises(ApiError) as caught:
            await ops.create(name="big", size_bytes=6 * GIB, disk_offering_id=SMALL_DISK, zone_id=ZONE1)
    assert caught.value.status == 422 and "custom-size offering" in caught.value.message


async def test_attach_and_detach_again_change_nothing(lab: LabCloudStack, db: Database) -> None:
    async with volumes_on(lab, db) as ops:
        volume = await ops.create(name="again", size_bytes=GIB, disk_offering_id=CUSTOM_DISK, zone_id=ZONE1)
        first = await ops.attach(volume.id)
        second = await ops.attach(volume.id)  # a restart finding it attached: only waits for the device
        assert first.device == second.device and second.volume.device_id == first.volume.device_id
        await ops.detach(volume.id)
        await ops.detach(volume.id)
        assert isinstance(ops.client, RecordingClient)
        assert [span[0] for span in ops.client.spans] == ["attachVolume", "detachVolume"]


async def test_a_device_that_never_appears_fails_the_attach_and_undoes_it(
    lab: LabCloudStack, db: Database
) -> None:
    async with volumes_on(lab, db, device_timeout=1) as ops:
        volume = await ops.create(name="lost", size_bytes=GIB, disk_offering_id=CUSTOM_DISK, zone_id=ZONE1)
        await lab.fault(command="attachVolume", mode="drop_device_link")
        with pytest.raises(ApiError) as caught:
            await ops.attach(volume.id)
        assert (caught.value.status, caught.value.code) == (504, DEVICE_TIMEOUT)
        assert str(lab.link(volume.id)) in caught.value.message
        assert (await ops.get(volume.id)).virtual_machine_id is None  # detached again
        attached = await ops.attach(volume.id)  # the next attach works
    assert attached.device.exists()


async def test_a_failed_attach_job_leaves_the_volume_detached(lab: LabCloudStack, db: Database) -> None:
    async with volumes_on(lab, db) as ops:
        volume = await ops.create(name="fail", size_bytes=GIB, disk_offering_id=CUSTOM_DISK, zone_id=ZONE1)
        await lab.fault(command="attachVolume", mode="job_failure", errorcode=530)
        with pytest.raises(ApiError) as caught:
            await ops.attach(volume.id)
        assert caught.value.status == 502 and caught.value.details["job_id"]
        assert (await ops.get(volume.id)).virtual_machine_id is None and not lab.link(volume.id).exists()


async def test_a_volume_attached_to_another_vm_is_not_taken(lab: LabCloudStack, db: Database) -> None:
    async with volumes_on(lab, db) as ops:
        vm = (
            await ops.client.job(
                "deployVirtualMachine",
                zoneid=ZONE1,
                serviceofferingid=MEDIUM_SO,
                templateid=TEMPLATE,
                networkids=ISOLATED,
                name="other",
            )
        )["virtualmachine"]
        volume = await ops.create(name="theirs", size_bytes=GIB, disk_offering_id=CUSTOM_DISK, zone_id=ZONE1)
        await ops.client.job("attachVolume", id=volume.id, virtualmachineid=vm["id"])
        for operation in (ops.attach, ops.detach):
            with pytest.raises(ApiError) as caught:
                await operation(volume.id)
            assert caught.value.status == 409 and vm["id"] in caught.value.message


def overlapping(spans: list[tuple[str, float, float]]) -> bool:
    ordered = sorted(spans, key=lambda s: s[1])
    return any(later[1] < earlier[2] for earlier, later in itertools.pairwise(ordered))


class NoLock(OmaVmLock):
    """No serialisation: the control that shows the test below can see overlapping jobs."""

    @asynccontextmanager
    async def hold(self, vm_id: str) -> AsyncIterator[None]:
        yield


@pytest.mark.parametrize("how", ["tasks", "processes", "unserialised"])
async def test_concurrent_attaches_run_one_at_a_time(tmp_path: Path, db: Database, how: str) -> None:
    async with run_cloudstack_lab(tmp_path / "cloudstack", job_delay=0.3) as lab:
        one_lock = OmaVmLock(db)
        locks = {
            "tasks": (one_lock, one_lock),  # the tasks of one OMA process
            "processes": (OmaVmLock(db), OmaVmLock(db)),  # two processes: the advisory lock alone
            "unserialised": (NoLock(db), NoLock(db)),
        }[how]
        async with volumes_on(lab, db, locks[0]) as a, volumes_on(lab, db, locks[1]) as b:
            va = await a.create(name="a", size_bytes=GIB, disk_offering_id=CUSTOM_DISK, zone_id=ZONE1)
            vb = await b.create(name="b", size_bytes=GIB, disk_offering_id=CUSTOM_DISK, zone_id=ZONE1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.attach, va.id)
                nursery.start_soon(b.attach, vb.id)
            assert lab.link(va.id).exists() and lab.link(vb.id).exists()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.detach, va.id)
                nursery.start_soon(b.detach, vb.id)
            assert isinstance(a.client, RecordingClient) and isinstance(b.client, RecordingClient)
            spans = a.client.spans + b.client.spans
    assert len(spans) == 4
    attaches = [s for s in spans if s[0] == "attachVolume"]
    detaches = [s for s in spans if s[0] == "detachVolume"]
    if how == "unserialised":
        assert overlapping(attaches) and overlapping(detaches)
    else:
        assert not overlapping(attaches) and not overlapping(detaches)
