"""What the service commands (``oma-api-server``, ``vma-api-server``) share to behave as tools do.

A failure an operator can fix (the port is taken, the configuration is unreadable or invalid, the
database refuses the connection) ends the command with one line on stderr, ``<prog>: <what>``, and
exit status 1 — never a traceback. :func:`failure_message` finds that line in whatever reached
the top: trio nurseries wrap errors in exception groups and ASGI lifespan failures chain them, so
it looks through both for the error that says what is wrong.

Under systemd (``Type=notify``) a service tells its manager when it is ready, that it is alive
and when it stops through :class:`Notifier` (see "systemd's notification protocol" below).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio

from pyapp.config import ConfigError

if TYPE_CHECKING:
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.config import Sockets

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The service cannot start for a reason the operator can fix; the message is the line shown."""


def _leaves(exc: BaseException, seen: set[int] | None = None) -> Iterator[BaseException]:
    """``exc``'s own errors: the members of exception groups, then what each was caused by."""
    seen = set() if seen is None else seen
    if id(exc) in seen:
        return
    seen.add(id(exc))
    if isinstance(exc, BaseExceptionGroup):
        for member in exc.exceptions:
            yield from _leaves(member, seen)
        return
    yield exc
    for linked in (exc.__cause__, exc.__context__):
        if linked is not None:
            yield from _leaves(linked, seen)


def failure_message(exc: BaseException) -> str:
    """One line saying why the service stopped: the operator's error when there is one (a
    :class:`StartupError` or :class:`ConfigError`), else a system error (``OSError``: refused,
    not found, permission), else the first error found."""
    leaves = list(_leaves(exc))
    for kinds in ((StartupError, ConfigError), (OSError,)):
        for leaf in leaves:
            if isinstance(leaf, kinds):
                return " ".join(str(leaf).split())
    first = leaves[0] if leaves else exc
    return " ".join(f"{type(first).__name__}: {first}".split())


def bind_sockets(hc: HypercornConfig) -> Sockets:
    """Open and listen on ``hc.bind`` before anything else starts, so that a taken port is
    reported at once (hypercorn itself binds only after the application has started)."""
    try:
        sockets = hc.create_sockets()
    except OSError as exc:
        raise StartupError(f"cannot listen on {', '.join(hc.bind)}: {exc.strerror or exc}") from exc
    for sock in sockets.insecure_sockets:
        sock.listen(hc.backlog)
    return sockets


# -- systemd's notification protocol -------------------------------------------------------------
#
# A ``Type=notify`` unit learns that the service is ready, alive and stopping from datagrams sent
# to the socket named by ``NOTIFY_SOCKET`` (sd_notify(3): ``READY=1``, ``WATCHDOG=1``,
# ``STOPPING=1``; a leading ``@`` names an abstract socket). The protocol is one ``sendto`` on a
# Unix datagram socket, so it is written here: the library that packages it on PyPI, ``sdnotify``,
# has had no release since 2017 and swallows every error, where a wrong socket path should be
# logged once so an operator can see why systemd says the start timed out.


class Notifier:
    """Sends sd_notify states to ``NOTIFY_SOCKET``; does nothing when the variable is unset (not
    run by systemd). A send that fails is logged once, never raised: the service keeps running."""

    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self.address: str | None = None
        if address:
            self.address = "\0" + address[1:] if address.startswith("@") else address
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *states: str) -> None:
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(states).encode(), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), exc)

    def ready(self, status: str | None = None) -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def watchdog_interval(self) -> float | None:
        """Half of ``WATCHDOG_USEC`` in seconds (the ping interval sd_watchdog_enabled(3)
        recommends), or None when systemd asked for no pings (unset, or meant for another PID)."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or self.address is None or (pid and pid.isdigit() and int(pid) != os.getpid()):
            return None
        try:
            value = int(usec)
        except ValueError:
            log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
            return None
        return value / 2e6 if value > 0 else None

    async def watchdog(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ping ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` until cancelled (returns at once when
        no watchdog is configured). A pinging event loop is a running one: a loop stuck in a
        blocking call stops pinging and systemd restarts the service."""
        interval = self.watchdog_interval()
        task_status.started()
        if interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(interval)
