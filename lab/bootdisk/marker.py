"""The line a booted lab guest prints on its serial console, and how it is read back.

A guest that booted prints exactly one line (do not change the format: the failover engine, the
lab CloudStack and the demo read it)::

    MOVER-LAB-BOOT vm=<name> data=<file> bytes=<n> sha256=<hex> macs=<mac>[,<mac>...]|-

``vm`` is the identity written into the image when it was built; ``data``, ``bytes`` and
``sha256`` describe the data file as the guest read it from its data partition at boot (so the
line proves the replicated bytes, not only the boot sector); ``macs`` are its network cards'
addresses in PCI order (``-`` when it has none). A guest whose kernel started but that cannot
read its data prints ``MOVER-LAB-ERROR vm=<name> error=<token>`` instead and idles too. A disk
that does not boot prints neither.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MARKER = "MOVER-LAB-BOOT"
ERROR_MARKER = "MOVER-LAB-ERROR"
#: What a VM name may hold: it is written into a shell script and a kernel command line.
VM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")

_LINE_RE = re.compile(
    rf"{MARKER} vm=(?P<vm>\S+) data=(?P<data>\S+) bytes=(?P<bytes>\d+) "
    r"sha256=(?P<sha256>[0-9a-f]{64}) macs=(?P<macs>\S+)"
)
_ERROR_RE = re.compile(rf"{ERROR_MARKER} vm=(?P<vm>\S+) error=(?P<error>\S+)")


@dataclass(frozen=True)
class BootMarker:
    """One guest's boot line, parsed."""

    vm: str
    data_file: str
    data_bytes: int
    sha256: str
    macs: tuple[str, ...]
    line: str


class GuestReportedError(RuntimeError):
    """The guest's kernel and init ran, but it could not read its data (its ``MOVER-LAB-ERROR``
    line is the message)."""


def check_vm_name(name: str) -> str:
    if not VM_NAME_RE.fullmatch(name):
        raise ValueError(f"lab VM names are 1-63 of [A-Za-z0-9._-], starting alphanumeric: {name!r}")
    return name


def find_marker(console: str, vm: str | None = None) -> BootMarker | None:
    """The first boot line in ``console`` (of ``vm`` when given); None when there is none yet.
    Raises :class:`GuestReportedError` when the guest printed its error line instead."""
    for raw in console.splitlines():
        line = raw.strip("\r\x00 ")
        error = _ERROR_RE.search(line)
        if error and (vm is None or error["vm"] == vm):
            raise GuestReportedError(line[error.start() :])
        m = _LINE_RE.search(line)
        if m is None or (vm is not None and m["vm"] != vm):
            continue
        macs = () if m["macs"] == "-" else tuple(m["macs"].split(","))
        return BootMarker(m["vm"], m["data"], int(m["bytes"]), m["sha256"], macs, line[m.start() :])
    return None
