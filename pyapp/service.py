"""What the service commands (``oma-api-server``, ``vma-api-server``) share to behave as tools do.

A failure an operator can fix (the port is taken, the configuration is unreadable or invalid, the
database refuses the connection) ends the command with one line on stderr, ``<prog>: <what>``, and
exit status 1 — never a traceback. :func:`failure_message` finds that line in whatever reached
the top: trio nurseries wrap errors in exception groups and ASGI lifespan failures chain them, so
it looks through both for the error that says what is wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

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
