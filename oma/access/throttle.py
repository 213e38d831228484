"""Login throttling, in PostgreSQL (``login_throttle``), so every OMA process on the database counts
the same failures: each attempt is counted, per user name and per client address, before its
password is checked; from the ``*_FREE_FAILURES``-th failure on, the key is locked for 1 s, 2 s,
4 s, ... (at most 15 min), and attempts while it is locked are refused (429, ``Retry-After``)
without checking the password. A success clears both keys.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import Final, Literal

from pyapp.db import Database

USER_FREE_FAILURES: Final = 5  # failed logins of one user name before its first lock
ADDRESS_FREE_FAILURES: Final = 20  # from one client address (several users behind one NAT)
FIRST_LOCK_S: Final = 1.0  # the first lock; each further failure doubles it ...
MAX_LOCK_S: Final = 900.0  # ... up to this
FAILURE_WINDOW_S: Final = 3600.0  # a key without a failure (or a lock) for this long starts over


# Count one attempt for a key unless it is locked, and lock it from the free_failures-th on
# ($1 key, $2 free failures, $3 first lock, $4 longest lock, $5 window; seconds). One statement:
# concurrent attempts, in any OMA process, serialise on the row, so a burst of guesses cannot all
# pass the check before any of them is counted. A locked key answers no row.
def _lock(n: str) -> str:
    return (
        f"CASE WHEN {n} >= $2::int THEN now() + make_interval(secs =>"
        f" least($3::float8 * 2 ^ least({n} - $2::int, 20), $4::float8)) END"
    )


_FAILURES = "CASE WHEN t.expires_at <= now() THEN 1 ELSE t.failures + 1 END"
_COUNT_SQL = (
    "INSERT INTO login_throttle AS t (key, failures, last_failure_at, locked_until, expires_at)"
    f" VALUES ($1, 1, now(), {_lock('1')}, greatest(now() + make_interval(secs => $5::float8), {_lock('1')}))"
    " ON CONFLICT (key) DO UPDATE SET"
    f" failures = {_FAILURES}, last_failure_at = now(), refused = 0, locked_until = {_lock(_FAILURES)},"
    f" expires_at = greatest(now() + make_interval(secs => $5::float8), {_lock(_FAILURES)})"
    " WHERE t.locked_until IS NULL OR t.locked_until <= now()"
    " RETURNING t.failures, extract(epoch FROM t.locked_until - now())::float8 AS locked_for"
)
_REFUSE_SQL = (
    "UPDATE login_throttle SET refused = refused + 1 WHERE key = $1 AND locked_until > now()"
    " RETURNING extract(epoch FROM locked_until - now())::float8 AS remaining, refused, failures"
)


@dataclass(frozen=True)
class Refusal:
    """A login refused because a key is locked."""

    scope: Literal["user", "address"]
    retry_after: int  # whole seconds, at least 1
    first: bool  # the first refusal of this lock (the one the audit log records)
    failures: int


def address_key(address: str) -> str:
    """What one client address is counted as: an IPv4 address (also when IPv4-mapped), or the
    /64 network of an IPv6 address — one host easily holds a whole /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def throttle_keys(username: str, address: str | None) -> list[tuple[Literal["user", "address"], str, int]]:
    """The keys an attempt counts against, address first: an attempt from a locked address does
    not count against the user it names."""
    keys: list[tuple[Literal["user", "address"], str, int]] = []
    if address:
        keys.append(("address", f"addr:{address_key(address)}", ADDRESS_FREE_FAILURES))
    keys.append(("user", f"user:{username}", USER_FREE_FAILURES))
    return keys


@dataclass(frozen=True)
class Counted:
    """An attempt counted against its keys: what to clear on success, what to audit on failure."""

    keys: list[str]
    failures: dict[str, int]  # scope -> failures counted so far, this one included
    locked_for: dict[str, float]  # scope -> seconds the key is now locked for, when it is


async def count_attempt(db: Database, username: str, address: str | None) -> Counted | Refusal:
    """Count a login attempt before its password is checked, or refuse it (a locked key)."""
    counted = Counted(keys=[], failures={}, locked_for={})
    for scope, key, free in throttle_keys(username, address):
        for _ in range(3):  # a lock that ends between the two statements: count again
            row = await db.fetchrow(_COUNT_SQL, key, free, FIRST_LOCK_S, MAX_LOCK_S, FAILURE_WINDOW_S)
            if row is not None:
                counted.keys.append(key)
                counted.failures[scope] = row["failures"]
                if row["locked_for"] is not None:
                    counted.locked_for[scope] = round(max(row["locked_for"], 0.0), 3)
                break
            refused = await db.fetchrow(_REFUSE_SQL, key)
            if refused is not None:
                return Refusal(
                    scope=scope,
                    retry_after=max(1, math.ceil(refused["remaining"])),
                    first=refused["refused"] == 1,
                    failures=refused["failures"],
                )
    return counted


async def clear_attempts(db: Database, counted: Counted) -> None:
    """A successful login: its user name and address start over."""
    await db.execute("DELETE FROM login_throttle WHERE key = ANY($1::text[])", counted.keys)


async def prune_attempts(db: Database) -> None:
    await db.execute("DELETE FROM login_throttle WHERE expires_at < now()")
