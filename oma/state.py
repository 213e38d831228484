"""What the running OMA holds: configuration, database, secret box, VMA client, recent logs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from quart import current_app

from oma.config import OmaConfig
from oma.crypto import SecretBox
from oma.vma_client import VmaClient
from pyapp.db import Database
from pyapp.logs import RecentRecords

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
