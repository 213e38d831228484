"""What the running OMA holds: configuration, database, secret box, VMA client, recent logs, the
engines and the replication job events. The service shell (:mod:`oma.app`) fills it; the HTTP
layer (:mod:`oma.api`) reads it through :func:`state`. Domains never import it: they are handed
what they need."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quart import current_app

from oma.config import OmaConfig
from oma.crypto import SecretBox
from oma.replication.events import JobEvents
from oma.replication.volumes import CloudVolumes
from oma.vma_client import VmaClient
from pyapp.db import Database
from pyapp.logs import RecentRecords

if TYPE_CHECKING:
    from oma.backups.engine import BackupEngine
    from oma.failover.engine import FailoverEngine
    from oma.replication.engine import ReplicationEngine

STATE_KEY = "oma"


@dataclass
class OmaState:
    config: OmaConfig
    recent_logs: RecentRecords | None
    started_monotonic: float = field(default_factory=time.monotonic)
    db_: Database | None = None
    box_: SecretBox | None = None
    vma_: VmaClient | None = None
    migrations_applied: list[int] = field(default_factory=list)
    #: Where the replication domain publishes job changes (the app subscribes the engine).
    job_events: JobEvents = field(default_factory=JobEvents)
    engine: ReplicationEngine | None = None
    #: The cloud's replica volumes (CloudStack's), set while serving.
    replica_volumes: CloudVolumes | None = None
    #: Set while the backup engine runs: wakes it up to claim a backup created here at once.
    backup_engine_wakeup: Callable[[], None] | None = None
    backup_engine: BackupEngine | None = None
    #: The failover engine (oma.failover), while the app serves.
    failover: FailoverEngine | None = None

    def wake_backup_engine(self) -> None:
        if self.backup_engine_wakeup is not None:
            self.backup_engine_wakeup()

    @property
    def db(self) -> Database:
        if self.db_ is None:
            raise RuntimeError("the database is not open (outside while_serving?)")
        return self.db_

    @property
    def box(self) -> SecretBox:
        if self.box_ is None:
            raise RuntimeError("the secret box is not loaded")
        return self.box_

    @property
    def vma(self) -> VmaClient:
        if self.vma_ is None:
            raise RuntimeError("the VMA client is not open")
        return self.vma_


def state() -> OmaState:
    value: OmaState = current_app.extensions[STATE_KEY]
    return value
