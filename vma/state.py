"""What the blueprints share: the configuration, the job tracker, the replicator, the exporter,
OMA clients, the tunnel."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import cast

import trio
from quart import current_app

from vma.config import VmaConfig
from vma.oma_client.client import OmaClient
from vma.replication.export import Exporter
from vma.replication.jobs import JobTracker, Journal
from vma.replication.replicate import Replicator
from vma.tunnel.ssh import Tunnel


@dataclass
class VmaState:
    config: VmaConfig
    tracker: JobTracker = field(init=False)
    started_mono: float = field(default_factory=time.monotonic)
    oma_clients: dict[str, OmaClient] = field(default_factory=dict)
    replicator: Replicator = field(init=False)
    exporter: Exporter = field(init=False)
    tunnel: Tunnel = field(init=False)

    def __post_init__(self) -> None:
        self.tunnel = Tunnel(self.config)
        self.tracker = JobTracker(Journal(self.config.work_dir))
        self.replicator = Replicator(self.config, self.oma_for)
        self.exporter = Exporter(self.config)

    def oma_for(self, base_url: str) -> OmaClient:
        """One client (one token) per OMA URL, with this VMA's enrollment credentials."""
        url = (base_url or self.config.oma_url).rstrip("/")
        client = self.oma_clients.get(url)
        if client is None:
            c = self.config
            client = OmaClient(
                url,
                c.appliance_id,
                c.oma_secret(),
                timeout=c.oma_timeout,
                renew_margin=c.token_renew_margin,
                backoff_initial=c.oma_backoff_initial,
                backoff_max=c.oma_backoff_max,
                unreachable_deadline=c.oma_unreachable_deadline,
            )
            self.oma_clients[url] = client
        return client

    async def aclose(self) -> None:
        for client in self.oma_clients.values():
            await client.aclose()
        self.oma_clients.clear()
        await trio.to_thread.run_sync(self.replicator.close)


def state() -> VmaState:
    return cast(VmaState, current_app.extensions["vma"])
