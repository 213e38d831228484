"""Asynchronous jobs, as CloudStack's ``AsyncJobManager`` presents them to a client.

An asynchronous command is answered with a ``jobid`` as soon as its synchronous part succeeded;
the job is pending (``jobstatus`` 0) for the configured delay, then its body runs and the job
ends succeeded (1, ``jobresult`` the object) or failed (2, ``jobresult`` ``{errorcode,
errortext}``, ``jobresultcode`` the errorcode). Bodies run one at a time under the cloud's lock and
shielded from cancellation: once a body started, it finishes and is saved, even while the double
shuts down. A job still pending when the double stops is failed at the next start.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from .cloud import Cloud
from .errors import CloudStackError, ServerApiError
from .faults import FaultMode
from .state import Job, cs_date

log = logging.getLogger(__name__)

Spawn = Callable[[Callable[[], Awaitable[None]]], None]


@dataclass
class AsyncStart:
    """What an asynchronous command's synchronous part hands over to its job."""

    body: Callable[[], Awaitable[dict[str, Any]]]
    instance_type: str | None = None
    instance_id: str | None = None
    #: create commands: the new object's id, answered beside the jobid
    created_id: str | None = None
    #: what a failed job leaves behind (a snapshot in Error, a VM in Error)
    on_failure: Callable[[], None] | None = None


class JobRunner:
    def __init__(self, cloud: Cloud, delay: float, spawn: Spawn) -> None:
        self.cloud = cloud
        self.delay = delay
        self._spawn = spawn

    async def submit(self, command: str, java_class: str, start: AsyncStart) -> Job:
        failure = self.cloud.faults.take(command, FaultMode.JOB_FAILURE)
        slow = self.cloud.faults.take(command, FaultMode.DELAY)
        job = Job(
            id=str(uuid.uuid4()),
            command=command,
            cmd=java_class,
            instancetype=start.instance_type,
            instanceid=start.instance_id,
            created=cs_date(),
        )
        self.cloud.state.jobs[job.id] = job
        await self.cloud.save()
        injected = ServerApiError(failure.errorcode, failure.errortext) if failure else None
        extra = slow.seconds if slow else 0.0

        async def run() -> None:
            await trio.sleep(self.delay + extra)
            with trio.CancelScope(shield=True):
                async with self.cloud.lock:
                    await self._finish(job, start, injected)
                    await self.cloud.save()

        self._spawn(run)
        return job

    async def _finish(self, job: Job, start: AsyncStart, injected: CloudStackError | None) -> None:
        try:
            if injected is not None:
                raise injected
            result = await start.body()
        except CloudStackError as exc:
            self._failed(job, start, int(exc.job_code), exc.text)
        except Exception as exc:  # an OSError from the files, or a defect: the job fails, the double lives
            log.exception("job %s (%s) failed", job.id, job.command)
            self._failed(job, start, 530, f"{type(exc).__name__}: {exc}")
        else:
            job.status, job.resultcode, job.result, job.completed = 1, 0, result, cs_date()

    def _failed(self, job: Job, start: AsyncStart, code: int, text: str) -> None:
        if start.on_failure is not None:
            start.on_failure()
        job.status, job.resultcode, job.completed = 2, code, cs_date()
        job.result = {"errorcode": code, "errortext": text}
