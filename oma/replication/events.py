"""How the replication domain tells the rest of the OMA that a job's state changed.

The domain publishes a :class:`JobChange` after the change committed (a job created, a status
changed); whoever needs to react subscribes a listener to the app's :class:`JobEvents` instead of
being called by the domain. The app wires the replication engine this way: a job created by this
process's API wakes its engine at once (otherwise it polls). Listeners are plain functions called
in the publisher's task: they must be quick and must not block (set an event, send on a channel);
one that raises is logged and the others still hear the change.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobChange:
    job_id: str
    #: The status before the change; None: the job was just created.
    old: str | None
    new: str


JobListener = Callable[[JobChange], None]


class JobEvents:
    """The listeners of one app's replication job changes."""

    def __init__(self) -> None:
        self._listeners: list[JobListener] = []

    def subscribe(self, listener: JobListener) -> Callable[[], None]:
        """Call ``listener`` with every change from now on; returns what unsubscribes it."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    def publish(self, change: JobChange) -> None:
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                log.exception("a listener of replication job changes failed", extra={"job_id": change.job_id})
