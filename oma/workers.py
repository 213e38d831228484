"""The life of an OMA background worker that claims rows: the replication engine, the backup
engine and the copy worker (:class:`ClaimWorker`); what the two engines that run their jobs on
the VMA share (:class:`VmaJobEngine`).

Each one runs as a background task of the app and, until stopped:

1. first recovers what a dead OMA process on this host left claimed (:meth:`recover_orphans`);
2. claims up to its free slots of pending rows with ``FOR UPDATE SKIP LOCKED`` (so several OMA
   processes on one database never drive the same row) and drives each in its own task;
3. sleeps until woken (a row was created, a slot freed) or its poll interval passes.

Leases (a worker with :attr:`ClaimWorker.lease_table`): every claimed row carries
``lease_expires_at``, which its worker renews every third of ``lease_ttl`` for the rows it drives.
A row whose lease ran out — its worker was killed, hangs, or lost the database for longer than
the lease — is taken over by any live worker on any host (:meth:`ClaimWorker.take_over_expired`,
run at start and then every ``lease_ttl / 2``): claimed again under ``FOR UPDATE SKIP LOCKED`` so
one taker wins, then handed to :meth:`ClaimWorker.take_over`, which ends it (and cleans up after
it). A row claimed on this host by a process that is gone (PID and start time, never a bare PID)
is taken over at once, without waiting for its lease. A worker that finds one of its rows no
longer renewable (taken over meanwhile) lets it go: its driver sees the row end.

The claim runs shielded: a claim cancelled in flight may have committed, and rows claimed by a
process that then never drives them would stay claimed. Claimed rows are always started; a drive
cancelled at once ends (or re-queues) its row itself.
"""

from __future__ import annotations

import logging
import socket
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import trio

from oma.config import OmaConfig
from oma.vcenter_login import ResolveLogin
from oma.vma_client import VmaClient
from pyapp.db import Database, Record
from pyapp.logs import log_context
from pyapp.process import ProcessRef

log = logging.getLogger(__name__)

#: How long the end of one driven row (stopping the VMA's copy or export, closing exports) may
#: hold a shutdown; each step of that end bounds itself by it.
FINISH_TIMEOUT = 8.0


def new_worker_id() -> str:
    """``host:pid@start:random``: who claimed a row, and whether that very process is still alive
    (PID and start time: a PID reused by another process does not keep a dead worker's claims)."""
    return f"{socket.gethostname()}:{ProcessRef.self()}:{uuid.uuid4().hex[:8]}"


def claimant_gone(claimed_by: str) -> bool:
    """True when ``claimed_by`` (a worker id, ``host:pid@start:nonce``) names an OMA process on
    this host that no longer runs: what it claimed is nobody's now. Claims of other hosts are left
    to their leases. (An id of an older release, ``host:pid:nonce``, is checked by PID alone.)"""
    host, _, rest = claimed_by.partition(":")
    process = rest.split(":", 1)[0]
    if host != socket.gethostname():
        return False
    ref = ProcessRef.parse(process)
    if ref is not None:
        return not ref.alive()
    return process.isdigit() and ProcessRef.of(int(process)) is None


class ClaimWorker(ABC):
    """Claim, drive, sleep; see the module documentation."""

    #: What the logs call it ("replication engine", …) and the ``action`` of its log records.
    kind: ClassVar[str]
    action: ClassVar[str]

    #: The claimed rows' table when they carry a lease (``lease_expires_at``), else None.
    lease_table: ClassVar[str | None] = None
    #: The statuses of that table's rows that a worker drives.
    active_statuses: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        max_active: int,
        poll_interval: float,
        db: Database | None = None,
        lease_ttl: float = 60.0,
    ) -> None:
        self.worker_id = new_worker_id()
        self.max_active = max_active
        self.poll_interval = poll_interval
        self.lease_db = db
        self.lease_ttl = lease_ttl
        self.stopped = trio.Event()
        self._stop = trio.Event()
        self._wake = trio.Event()

    def wake(self) -> None:
        """Claim at once instead of at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    @abstractmethod
    def active_count(self) -> int:
        """Rows this process drives now."""

    @abstractmethod
    async def claim(self, limit: int) -> Sequence[Any]:
        """Claim up to ``limit`` pending rows (one statement, ``SKIP LOCKED``)."""

    @abstractmethod
    def start(self, nursery: trio.Nursery, row: Any) -> None:
        """Start driving one claimed row in ``nursery``."""

    def driven_ids(self) -> list[str]:
        """The ids of the rows this process drives now (their leases are renewed)."""
        return []

    async def recover_orphans(self) -> None:
        """Deal with the rows a dead process on this host left claimed (default: the lease
        takeover, for a worker with leases)."""
        await self.take_over_expired()

    async def take_over(self, row: Record) -> None:
        """End (or resume) a row taken over from ``row["previous"]``, a worker that stopped
        renewing its lease or is gone; the row is claimed by this worker now."""
        return

    async def take_over_expired(self) -> int:
        """Claim and hand to :meth:`take_over` every active row whose lease ran out, or whose
        claimant on this host is gone; returns how many."""
        table, db = self.lease_table, self.lease_db
        if table is None or db is None:
            return 0
        statuses = list(self.active_statuses)
        host_claims = await db.fetch(
            f"SELECT id, claimed_by FROM {table} WHERE status = ANY($1::text[]) AND claimed_by LIKE $2",
            statuses,
            f"{socket.gethostname()}:%",
        )
        gone = [
            r["id"]
            for r in host_claims
            if r["claimed_by"] != self.worker_id and claimant_gone(r["claimed_by"])
        ]
        # A row's lease: lease_expires_at, or (claimed before its first renewal) claimed_at + ttl.
        rows = await db.fetch(
            f"UPDATE {table} t SET claimed_by = $1, claimed_at = now(),"
            " lease_expires_at = now() + make_interval(secs => $2)"
            f" FROM (SELECT id, claimed_by AS previous FROM {table}"
            "   WHERE status = ANY($3::text[]) AND claimed_by IS NOT NULL AND claimed_by <> $1"
            "   AND (id = ANY($4::text[])"
            "        OR COALESCE(lease_expires_at, claimed_at + make_interval(secs => $2)) < now())"
            "   FOR UPDATE SKIP LOCKED) o"
            " WHERE t.id = o.id RETURNING t.id, o.previous",
            self.worker_id,
            self.lease_ttl,
            statuses,
            gone,
        )
        for row in rows:
            with log_context(job_id=row["id"]):
                log.warning(
                    "%s: taking over a job whose worker stopped",
                    self.kind,
                    extra={"previous": row["previous"]},
                )
                try:
                    await self.take_over(row)
                except Exception:
                    log.exception("%s: taking over the job failed", self.kind)
        return len(rows)

    async def renew_leases(self) -> list[str]:
        """Extend the lease of every row this process drives; returns the ids it could not renew
        (taken over by another worker meanwhile)."""
        table, db, ids = self.lease_table, self.lease_db, self.driven_ids()
        if table is None or db is None or not ids:
            return []
        renewed = await db.fetch(
            f"UPDATE {table} SET lease_expires_at = now() + make_interval(secs => $3)"
            " WHERE id = ANY($1::text[]) AND claimed_by = $2 RETURNING id",
            ids,
            self.worker_id,
            self.lease_ttl,
        )
        return sorted(set(ids) - {r["id"] for r in renewed})

    async def _lease_loop(self) -> None:
        """Renew this worker's leases every ``lease_ttl / 3`` and take over expired ones every
        ``lease_ttl / 2``."""
        last_takeover = trio.current_time()
        while True:
            await trio.sleep(self.lease_ttl / 3)
            try:
                with trio.CancelScope(shield=True):
                    lost = await self.renew_leases()
                for job_id in lost:
                    log.warning(
                        "%s: the lease of a job was lost to another worker",
                        self.kind,
                        extra={"job_id": job_id},
                    )
            except Exception:
                log.exception("%s: renewing leases failed", self.kind)
            if trio.current_time() - last_takeover >= self.lease_ttl / 2:
                last_takeover = trio.current_time()
                try:
                    with trio.CancelScope(shield=True):
                        if await self.take_over_expired():
                            self.wake()
                except Exception:
                    log.exception("%s: taking over expired jobs failed", self.kind)

    async def start_side_tasks(self, nursery: trio.Nursery) -> None:
        """Start tasks that live as long as the worker (default: none)."""
        return

    async def on_stop(self) -> None:
        """The last step of a stop, shielded (default: nothing)."""
        return

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with log_context(action=self.action):
            log.info("%s started", self.kind, extra={"worker_id": self.worker_id})
            try:
                try:
                    await self.recover_orphans()
                except Exception:
                    log.exception("%s: recovering the work of a stopped OMA process failed", self.kind)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._claim_loop, nursery)
                    if self.lease_table is not None:
                        nursery.start_soon(self._lease_loop)
                    await self.start_side_tasks(nursery)
                    task_status.started()
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await self.on_stop()
                self.stopped.set()
                log.info("%s stopped", self.kind)

    async def _claim_loop(self, nursery: trio.Nursery) -> None:
        while True:
            self._wake = trio.Event()  # reset before claiming: a wake-up during the claim is kept
            free = self.max_active - self.active_count()
            if free > 0:
                try:
                    with trio.CancelScope(shield=True):
                        claimed = await self.claim(free)
                except Exception:
                    log.exception("%s: claiming failed", self.kind)
                    claimed = []
                for row in claimed:
                    self.start(nursery, row)
                if claimed and self.lease_table is not None:
                    try:
                        with trio.CancelScope(shield=True):
                            await self.renew_leases()  # the first lease at once, not a third later
                    except Exception:
                        log.exception("%s: renewing leases failed", self.kind)
            with trio.move_on_after(self.poll_interval):
                await self._wake.wait()


class VmaJobEngine(ClaimWorker):
    """A claim worker whose jobs run on the VMA (the replication and the backup engine): its
    configuration, database, VMA client and the vCenter logins its jobs are sent with; it polls
    every ``engine_poll_interval`` and its claims last ``job_lease_ttl``."""

    def __init__(
        self, config: OmaConfig, db: Database, vma: VmaClient, resolve_login: ResolveLogin, *, max_active: int
    ) -> None:
        super().__init__(
            max_active=max_active,
            poll_interval=config.engine_poll_interval,
            db=db,
            lease_ttl=config.job_lease_ttl,
        )
        self.config = config
        self.db = db
        self.vma = vma
        self.resolve_login = resolve_login

    @property
    def engine_id(self) -> str:
        return self.worker_id
