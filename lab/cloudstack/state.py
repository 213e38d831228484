"""What clients create in the lab cloud, and how it is kept on disk.

``<data-dir>/state.json`` holds every VM, volume, snapshot and async job (removed ones too:
CloudStack keeps removed rows, and a removed object's UUID still passes parameter checks before
the service layer says it is gone). It is written to a temporary name, fsynced, renamed over the
old file and the directory fsynced, after every change, so a double killed at any moment restarts
with the last state a client was told about.

Volume contents live beside it: ``<data-dir>/primary/<volume uuid>`` (raw, sparse, created when a
volume is first attached, as CloudStack creates it on primary storage then) and snapshot copies
in ``<data-dir>/secondary/snapshots/<snapshot uuid>``.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio
from pydantic import BaseModel, Field

STATE_VERSION = 1


def cs_date(when: datetime | None = None) -> str:
    """A date as CloudStack's serializer writes it (``yyyy-MM-dd'T'HH:mm:ssZ``, here in UTC)."""
    return (when or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S+0000")


class Nic(BaseModel):
    id: str
    networkid: str
    macaddress: str
    ipaddress: str | None
    isdefault: bool
    deviceid: int


class VirtualMachine(BaseModel):
    id: str
    internalid: int
    name: str
    displayname: str
    zoneid: str
    serviceofferingid: str
    templateid: str
    state: str  # Stopped, Starting, Running, Stopping, Destroyed, Expunging, Error
    created: str
    nics: list[Nic]
    haenable: bool = False
    is_oma: bool = False
    removed: str | None = None
    #: the qemu running the VM (``pid@start``, :class:`pyapp.process.ProcessRef`), while it runs
    guest: str | None = None

    @property
    def instancename(self) -> str:
        return f"i-2-{self.internalid}-VM"


class Volume(BaseModel):
    id: str
    internalid: int
    name: str
    zoneid: str
    type: str  # ROOT or DATADISK
    size: int
    state: str  # Allocated, Ready, Destroy, Expunged
    created: str
    diskofferingid: str | None = None
    templateid: str | None = None
    virtualmachineid: str | None = None
    deviceid: int | None = None
    attached: str | None = None
    removed: str | None = None
    path: str | None = Field(default=None, description="file name in primary storage, once Ready")


class Snapshot(BaseModel):
    id: str
    internalid: int
    name: str
    volumeid: str
    zoneid: str
    state: str  # Allocated, Creating, BackedUp, Error, Destroyed
    created: str
    virtualsize: int
    physicalsize: int = 0
    removed: str | None = None


class Job(BaseModel):
    id: str
    command: str  # the API command, e.g. attachVolume
    cmd: str  # the command's Java class, as CloudStack reports it
    status: int = 0  # 0 pending, 1 succeeded, 2 failed
    resultcode: int = 0
    result: dict[str, Any] | None = None
    instancetype: str | None = None
    instanceid: str | None = None
    created: str
    completed: str | None = None


class State(BaseModel):
    version: int = STATE_VERSION
    next_internal_id: int = 1
    vms: dict[str, VirtualMachine] = Field(default_factory=dict)
    volumes: dict[str, Volume] = Field(default_factory=dict)
    snapshots: dict[str, Snapshot] = Field(default_factory=dict)
    jobs: dict[str, Job] = Field(default_factory=dict)

    def new_internal_id(self) -> int:
        value = self.next_internal_id
        self.next_internal_id += 1
        return value


def write_atomically(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename over ``path``, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateStore:
    """``state.json`` in the data directory. Saves are serialised: each writes the state as it is
    when its turn comes, so the file never goes back to an older state."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "state.json"
        self._lock = trio.Lock()

    def load(self) -> State:
        if not self.path.exists():
            return State()
        state = State.model_validate_json(self.path.read_bytes())
        if state.version != STATE_VERSION:
            raise ValueError(f"{self.path}: state version {state.version}, this double reads {STATE_VERSION}")
        return state

    async def save(self, state: State) -> None:
        async with self._lock:
            data = json.dumps(state.model_dump(mode="json"), indent=1, sort_keys=True).encode()
            await trio.to_thread.run_sync(write_atomically, self.path, data)
