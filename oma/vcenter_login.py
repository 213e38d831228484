"""The vCenter login a job runs with, as the engines that send it to the VMA see it.

The replication and backup engines tell the VMA which vCenter to reach and how to log in; they
get the login from a :data:`ResolveLogin` function the app hands them (the credentials domain
decrypts the password for that one call). This module is only the shape of that exchange, so
that neither engine depends on the other, nor on where credentials are kept.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol


class Login(Protocol):
    @property
    def vcenter(self) -> str: ...
    @property
    def username(self) -> str: ...
    @property
    def password(self) -> str: ...
    @property
    def tls_mode(self) -> str: ...
    @property
    def tls_thumbprint(self) -> str: ...


#: The login for a VMware credential id (None: the default credential).
ResolveLogin = Callable[[int | None], Awaitable[Login]]
