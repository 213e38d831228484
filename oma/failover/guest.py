"""How the engine tells that the failed-over guest answers (``OMA_FAILOVER_GUEST_CHECK``).

A check is called once CloudStack says the VM is ``Running`` and returns what it saw (recorded in
the ``start`` step) or raises :class:`GuestNotAnswering` at its deadline:

- ``running`` (the default, production): CloudStack's ``Running`` is the answer. A deployment
  wanting more (a TCP port, an agent) adds a check here;
- ``lab-console``: the lab CloudStack's serial console of the VM
  (``<CloudStack base>/lab/vms/<id>/console``, served by the double only, ``docs/cloudstack-lab.md``)
  until it shows the lab guest's boot line ``MOVER-LAB-BOOT ...`` (``docs/lab-boot.md``);
  ``MOVER-LAB-ERROR`` there fails at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import trio

RUNNING_CHECK = "running"
LAB_CONSOLE_CHECK = "lab-console"
CHECKS = (RUNNING_CHECK, LAB_CONSOLE_CHECK)
BOOT_MARKER = "MOVER-LAB-BOOT "
ERROR_MARKER = "MOVER-LAB-ERROR "
POLL_S = 0.25

#: ``check(api_url, vm_id, deadline_s)``: what the guest showed.
GuestCheck = Callable[[str, str, float], Awaitable[dict[str, Any]]]


class GuestNotAnswering(Exception):
    pass


async def running_check(api_url: str, vm_id: str, deadline_s: float) -> dict[str, Any]:
    return {"check": RUNNING_CHECK}


async def lab_console_check(api_url: str, vm_id: str, deadline_s: float) -> dict[str, Any]:
    url = f"{api_url.removesuffix('/client/api')}/lab/vms/{vm_id}/console"
    text = ""
    async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
        with trio.move_on_after(deadline_s):
            while True:
                r = await http.get(url)
                if r.status_code == 200:
                    text = r.text
                    for line in text.splitlines():
                        if line.startswith(BOOT_MARKER):
                            return {"check": LAB_CONSOLE_CHECK, "marker": line.strip()}
                        if line.startswith(ERROR_MARKER):
                            raise GuestNotAnswering(f"the guest booted but reports {line.strip()}")
                await trio.sleep(POLL_S)
    raise GuestNotAnswering(
        f"the guest printed no boot line on its console within {deadline_s:g} s"
        f" (last output: {text[-300:]!r})"
    )


def guest_check(name: str) -> GuestCheck:
    if name == LAB_CONSOLE_CHECK:
        return lab_console_check
    if name == RUNNING_CHECK:
        return running_check
    raise ValueError(f"unknown failover guest check {name!r}: one of {', '.join(CHECKS)}")
