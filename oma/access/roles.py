"""The user roles, each including the one before, and the principal a token stands for.

``viewer`` (read-only), ``operator`` (runs replications, backups and restores), ``admin`` (users,
credentials, enrollment administration, debug); an enrolled VMA's principal has the role ``vma``,
which includes none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, get_args

Role = Literal["viewer", "operator", "admin"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)  # least to most privileged


@dataclass(frozen=True)
class Principal:
    role: str  # viewer | operator | admin | vma
    subject: str  # user name or VMA appliance id
    user_id: int | None = None
    vma_id: str | None = None
    token_id: str | None = None  # the handle of the token this request came with

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def has(self, role: Role) -> bool:
        """The principal's role includes ``role`` (a VMA has none of the users' roles)."""
        return self.role in ROLES and ROLES.index(self.role) >= ROLES.index(role)
