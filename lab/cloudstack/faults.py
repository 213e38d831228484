"""Fault injection: lab-only switches that make the next calls of a command go wrong.

A fault names an API command and how its next ``times`` calls fail (counted among calls whose
signature was accepted, in arrival order; several faults for one command and mode are used one
after the other):

``error``
    the call is answered at once with a CloudStack error body and ``errorcode`` as the HTTP
    status (any 4xx/5xx: a 503 stands for an overloaded management server or its proxy); nothing
    changes in the cloud.
``job_failure``
    an asynchronous command is accepted (``jobid``) and its job fails with
    ``errorcode``/``errortext`` (``jobstatus`` 2); nothing changes in the cloud. Objects a
    create command allocated before its job (a volume, a snapshot, a VM) stay, as they do when a
    real job fails.
``delay``
    the job takes ``seconds`` longer before it runs.
``drop_device_link``
    ``attachVolume`` to the OMA VM succeeds in CloudStack's eyes but the device never appears in
    the OMA guest's ``disk/by-id`` (a guest that missed the hot-plug).
"""

from __future__ import annotations

import enum
from collections import deque

from pydantic import BaseModel, ConfigDict, Field, field_validator


class FaultMode(enum.StrEnum):
    ERROR = "error"
    JOB_FAILURE = "job_failure"
    DELAY = "delay"
    DROP_DEVICE_LINK = "drop_device_link"


class Fault(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command: str = Field(min_length=1)
    mode: FaultMode
    times: int = Field(default=1, ge=1)
    errorcode: int = Field(default=530, ge=400, le=599)
    errortext: str = "Injected failure (lab CloudStack fault)"
    seconds: float = Field(default=0.0, ge=0, le=3600)

    @field_validator("command")
    @classmethod
    def _api_name(cls, value: str) -> str:
        if not value.isalnum():
            raise ValueError("an API command name, e.g. attachVolume")
        return value


class Faults:
    def __init__(self) -> None:
        self._pending: deque[Fault] = deque()

    def add(self, fault: Fault) -> None:
        self._pending.append(fault)

    def take(self, command: str, mode: FaultMode) -> Fault | None:
        """The first pending fault for ``command`` and ``mode``, used once (None: no fault)."""
        for fault in self._pending:
            if fault.command == command and fault.mode == mode:
                fault.times -= 1
                if fault.times == 0:
                    self._pending.remove(fault)
                return fault
        return None

    def pending(self) -> list[Fault]:
        return list(self._pending)

    def clear(self) -> None:
        self._pending.clear()
