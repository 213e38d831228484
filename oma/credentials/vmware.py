"""VMware credentials (``vmware_credentials``): one vCenter login each, the password encrypted with
AES-256-GCM before it reaches the database (:class:`oma.crypto.SecretBox`, purpose
:data:`PURPOSE`) and never part of any answer nor of any log record.

vCenter TLS: each credential says how the VMA checks vCenter's certificate, ``tls_mode``:
``verify`` (the default: CAs and name), ``thumbprint`` (``tls_thumbprint``, the certificate's
SHA-256 fingerprint as VMware tools show it, ``AB:CD:...``; SHA-1 is accepted too) or
``insecure`` (nothing is checked: only when asked for by name; every answer shows it and the
OMA and the VMA log a warning naming the vCenter).

At most one credential is the default (a partial unique index); discovery uses it when a request
names no credential. Testing a credential really connects: the VMA runs a discovery with it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from oma.crypto import SecretBox, SecretBoxError
from oma.store.rows import row_dict
from oma.vma_client import DiscoverResult, VmaClient, VmaError, VmaUnreachable
from pyapp.api import ApiError
from pyapp.db import Database, Record, UniqueViolation
from pyapp.logs import log_context

log = logging.getLogger(__name__)

PURPOSE = b"vmware-credential"
PUBLIC_COLUMNS = (
    "id, credential_name, vcenter_host, username, datacenter, is_active, is_default, created_by,"
    " created_at, updated_at, last_used_at, usage_count, last_test_at, last_test_ok, last_test_message,"
    " tls_mode, tls_thumbprint"
)

TlsMode = Literal["verify", "thumbprint", "insecure"]


def check_tls(mode: str, thumbprint: str) -> None:
    """A thumbprint goes with ``tls_mode`` ``thumbprint``, and only with it (ValueError)."""
    if mode == "thumbprint" and not thumbprint:
        raise ValueError("tls_mode 'thumbprint' needs tls_thumbprint (the certificate's SHA-256 fingerprint)")
    if mode != "thumbprint" and thumbprint:
        raise ValueError(f"tls_thumbprint is given only with tls_mode 'thumbprint', not {mode!r}")


@dataclass(frozen=True)
class VCenterLogin:
    credential_id: int | None
    vcenter: str
    username: str
    password: str = field(repr=False)
    datacenter: str
    tls_mode: str = "verify"
    tls_thumbprint: str = ""


@dataclass(frozen=True)
class NewCredential:
    credential_name: str
    vcenter_host: str
    username: str
    password: str = field(repr=False)
    datacenter: str
    is_active: bool
    is_default: bool
    tls_mode: TlsMode
    tls_thumbprint: str


@dataclass(frozen=True)
class CredentialChanges:
    """What an update sets; None leaves a field as it is. A new ``tls_mode`` other than
    ``thumbprint`` clears the thumbprint."""

    credential_name: str | None
    vcenter_host: str | None
    username: str | None
    password: str | None = field(repr=False)
    datacenter: str | None
    is_active: bool | None
    tls_mode: TlsMode | None
    tls_thumbprint: str | None


async def _get(db: Database, cred_id: int) -> Record:
    row = await db.fetchrow(f"SELECT {PUBLIC_COLUMNS} FROM vmware_credentials WHERE id = $1", cred_id)
    if row is None:
        raise ApiError.not_found(f"VMware credential {cred_id} not found")
    return row


async def resolve_login(db: Database, box: SecretBox, credential_id: int | None) -> VCenterLogin:
    """The vCenter login of ``credential_id`` (the default one when None), password decrypted."""
    if credential_id is None:
        row = await db.fetchrow(
            "SELECT id, vcenter_host, username, datacenter, password_ciphertext, is_active, tls_mode,"
            " tls_thumbprint FROM vmware_credentials WHERE is_default"
        )
        if row is None:
            raise ApiError.unprocessable("no credential_id given and no default VMware credential is set")
    else:
        row = await db.fetchrow(
            "SELECT id, vcenter_host, username, datacenter, password_ciphertext, is_active, tls_mode,"
            " tls_thumbprint FROM vmware_credentials WHERE id = $1",
            credential_id,
        )
        if row is None:
            raise ApiError.not_found(f"VMware credential {credential_id} not found")
    if not row["is_active"]:
        raise ApiError.conflict(f"VMware credential {row['id']} is disabled")
    try:
        password = box.decrypt(row["password_ciphertext"], PURPOSE)
    except SecretBoxError as exc:
        raise ApiError(500, "OPERATION_FAILED", f"credential {row['id']} cannot be decrypted: {exc}") from exc
    await db.execute(
        "UPDATE vmware_credentials SET last_used_at = now(), usage_count = usage_count + 1 WHERE id = $1",
        row["id"],
    )
    if row["tls_mode"] == "insecure":
        _warn_insecure(row["id"], row["vcenter_host"])
    return VCenterLogin(
        row["id"],
        row["vcenter_host"],
        row["username"],
        password,
        row["datacenter"],
        row["tls_mode"],
        row["tls_thumbprint"],
    )


async def discover_with(vma: VmaClient, login: VCenterLogin, filter: str = "") -> DiscoverResult:
    """The VMA's discovery of the VMs ``login`` sees in vCenter (``filter``: the VMA's filter)."""
    return await vma.discover(
        vcenter=login.vcenter,
        username=login.username,
        password=login.password,
        datacenter=login.datacenter,
        tls_mode=login.tls_mode,
        tls_thumbprint=login.tls_thumbprint,
        filter=filter,
    )


def _warn_insecure(cred_id: int, vcenter: str) -> None:
    log.warning(
        "VMware credential %s connects to vCenter %s without TLS verification (tls_mode insecure)",
        cred_id,
        vcenter,
        extra={"credential_id": cred_id, "vcenter": vcenter, "tls_mode": "insecure"},
    )


async def list_credentials(db: Database) -> dict[str, Any]:
    rows = await db.fetch(f"SELECT {PUBLIC_COLUMNS} FROM vmware_credentials ORDER BY credential_name")
    return {"credentials": [row_dict(r) for r in rows], "count": len(rows)}


async def create_credential(
    db: Database, box: SecretBox, new: NewCredential, created_by: str
) -> dict[str, Any]:
    ciphertext = box.encrypt(new.password, PURPOSE)
    try:
        async with db.transaction() as conn:
            if new.is_default:
                await conn.execute("UPDATE vmware_credentials SET is_default = false WHERE is_default")
            row = await conn.fetchrow(
                "INSERT INTO vmware_credentials (credential_name, vcenter_host, username,"
                " password_ciphertext, datacenter, is_active, is_default, created_by, tls_mode,"
                " tls_thumbprint)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                f" RETURNING {PUBLIC_COLUMNS}",
                new.credential_name,
                new.vcenter_host,
                new.username,
                ciphertext,
                new.datacenter,
                new.is_active,
                new.is_default,
                created_by,
                new.tls_mode,
                new.tls_thumbprint,
            )
    except UniqueViolation as exc:
        raise ApiError.conflict(f"a credential named {new.credential_name!r} already exists") from exc
    assert row is not None
    with log_context(action="credential_create"):
        log.info(
            "VMware credential created",
            extra={"credential_id": row["id"], "vcenter": new.vcenter_host, "tls_mode": new.tls_mode},
        )
        if new.tls_mode == "insecure":
            _warn_insecure(row["id"], new.vcenter_host)
    return row_dict(row)


async def default_credential(db: Database) -> dict[str, Any]:
    row = await db.fetchrow(f"SELECT {PUBLIC_COLUMNS} FROM vmware_credentials WHERE is_default")
    if row is None:
        raise ApiError.not_found("no default VMware credential is set")
    return row_dict(row)


async def get_credential(db: Database, cred_id: int) -> dict[str, Any]:
    return row_dict(await _get(db, cred_id))


async def update_credential(
    db: Database, box: SecretBox, cred_id: int, changes: CredentialChanges
) -> dict[str, Any]:
    ciphertext = box.encrypt(changes.password, PURPOSE) if changes.password is not None else None
    mode, thumbprint = await _new_tls(db, cred_id, changes)
    try:
        row = await db.fetchrow(
            "UPDATE vmware_credentials SET credential_name = COALESCE($2, credential_name),"
            " vcenter_host = COALESCE($3, vcenter_host), username = COALESCE($4, username),"
            " password_ciphertext = COALESCE($5, password_ciphertext), datacenter = COALESCE($6, datacenter),"
            " is_active = COALESCE($7, is_active), tls_mode = COALESCE($8, tls_mode),"
            " tls_thumbprint = COALESCE($9, tls_thumbprint), updated_at = now()"
            f" WHERE id = $1 RETURNING {PUBLIC_COLUMNS}",
            cred_id,
            changes.credential_name,
            changes.vcenter_host,
            changes.username,
            ciphertext,
            changes.datacenter,
            changes.is_active,
            mode,
            thumbprint,
        )
    except UniqueViolation as exc:
        raise ApiError.conflict(f"a credential named {changes.credential_name!r} already exists") from exc
    if row is None:
        raise ApiError.not_found(f"VMware credential {cred_id} not found")
    with log_context(action="credential_update"):
        log.info(
            "VMware credential updated",
            extra={
                "credential_id": cred_id,
                "password_changed": ciphertext is not None,
                "tls_mode": row["tls_mode"],
            },
        )
        if mode == "insecure":
            _warn_insecure(cred_id, row["vcenter_host"])
    return row_dict(row)


async def _new_tls(db: Database, cred_id: int, changes: CredentialChanges) -> tuple[str | None, str | None]:
    """The ``(tls_mode, tls_thumbprint)`` an update sets (None: unchanged), checked together with
    what the credential has: a new mode other than ``thumbprint`` clears the thumbprint."""
    if changes.tls_mode is None and changes.tls_thumbprint is None:
        return None, None
    current = await _get(db, cred_id)
    mode = changes.tls_mode or current["tls_mode"]
    if changes.tls_thumbprint is not None:
        thumbprint = changes.tls_thumbprint
    else:
        thumbprint = current["tls_thumbprint"] if mode == "thumbprint" else ""
    try:
        check_tls(mode, thumbprint)
    except ValueError as exc:
        raise ApiError.unprocessable(str(exc)) from exc
    return mode, thumbprint


async def delete_credential(db: Database, cred_id: int) -> dict[str, Any]:
    deleted = await db.fetchval("DELETE FROM vmware_credentials WHERE id = $1 RETURNING id", cred_id)
    if deleted is None:
        raise ApiError.not_found(f"VMware credential {cred_id} not found")
    with log_context(action="credential_delete"):
        log.info("VMware credential deleted", extra={"credential_id": cred_id})
    return {"message": "credential deleted", "id": cred_id}


async def set_default_credential(db: Database, cred_id: int) -> dict[str, Any]:
    async with db.transaction() as conn:
        exists = await conn.fetchval(
            "SELECT is_active FROM vmware_credentials WHERE id = $1 FOR UPDATE", cred_id
        )
        if exists is None:
            raise ApiError.not_found(f"VMware credential {cred_id} not found")
        if not exists:
            raise ApiError.conflict(f"VMware credential {cred_id} is disabled and cannot be the default")
        await conn.execute(
            "UPDATE vmware_credentials SET is_default = false WHERE is_default AND id <> $1", cred_id
        )
        await conn.execute(
            "UPDATE vmware_credentials SET is_default = true, updated_at = now() WHERE id = $1", cred_id
        )
    return row_dict(await _get(db, cred_id))


async def try_login(db: Database, box: SecretBox, vma: VmaClient, cred_id: int) -> dict[str, Any]:
    """Connect with the credential: the VMA runs a discovery with it. The outcome (how many VMs
    it saw, or why it could not) is recorded in the credential and answered."""
    await _get(db, cred_id)
    login = await resolve_login(db, box, cred_id)
    started = time.monotonic()
    try:
        result = await discover_with(vma, login)
    except VmaUnreachable as exc:
        ok, message, vm_count = False, f"could not reach the VMA to test: {exc.message}", None
    except VmaError as exc:
        ok, message, vm_count = False, f"vCenter connection failed: {exc.message}", None
    else:
        ok, vm_count = True, len(result.vms)
        message = f"connected to {result.vcenter.host} ({result.vcenter.datacenter}); {vm_count} VMs visible"
    await db.execute(
        "UPDATE vmware_credentials SET last_test_at = now(), last_test_ok = $2, last_test_message = $3 "
        "WHERE id = $1",
        cred_id,
        ok,
        message,
    )
    with log_context(action="credential_test"):
        log.info("VMware credential tested", extra={"credential_id": cred_id, "success": ok})
    return {
        "id": cred_id,
        "success": ok,
        "message": message,
        "vm_count": vm_count,
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
    }
