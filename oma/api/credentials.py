"""VMware credentials management (administrators only).

The vCenter password is encrypted with AES-256-GCM before it reaches the database (see
``oma.crypto``) and is never part of any answer nor of any log record. ``POST .../test`` really
connects: it asks the VMA to run a discovery with these credentials and reports how many VMs it
saw, or why it could not (VMA unreachable, vCenter refused, ...).

vCenter TLS: each credential says how the VMA checks vCenter's certificate, ``tls_mode``:
``verify`` (the default: CAs and name), ``thumbprint`` (``tls_thumbprint``, the certificate's
SHA-256 fingerprint as VMware tools show it, ``AB:CD:...``; SHA-1 is accepted too) or
``insecure`` (nothing is checked: only when asked for by name; every answer shows it and the
OMA and the VMA log a warning naming the vCenter).

At most one credential is the default (a partial unique index); discovery uses it when a request
names no credential.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, Field, model_validator
from quart import Blueprint
from quart_schema import validate_request

from oma.api.access import current_principal, requires
from oma.api.requests import MAX_NAME, RequestModel
from oma.crypto import SecretBoxError
from oma.state import state
from oma.store.rows import row_dict
from oma.vma_client import VmaError, VmaUnreachable
from pyapp.api import ApiError
from pyapp.db import Record, UniqueViolation
from pyapp.logs import log_context
from pyapp.thumbprint import normalize_thumbprint

log = logging.getLogger(__name__)
bp = Blueprint("credentials", __name__)

PURPOSE = b"vmware-credential"
PUBLIC_COLUMNS = (
    "id, credential_name, vcenter_host, username, datacenter, is_active, is_default, created_by,"
    " created_at, updated_at, last_used_at, usage_count, last_test_at, last_test_ok, last_test_message,"
    " tls_mode, tls_thumbprint"
)

TlsMode = Literal["verify", "thumbprint", "insecure"]


def _thumbprint(value: str) -> str:
    """The pinned thumbprint, normalised (:func:`pyapp.thumbprint.normalize_thumbprint`); "" for none."""
    return normalize_thumbprint(value) if value.strip() else ""


Thumbprint = Annotated[str, Field(max_length=200), AfterValidator(_thumbprint)]


def _check_tls(mode: str, thumbprint: str) -> None:
    if mode == "thumbprint" and not thumbprint:
        raise ValueError("tls_mode 'thumbprint' needs tls_thumbprint (the certificate's SHA-256 fingerprint)")
    if mode != "thumbprint" and thumbprint:
        raise ValueError(f"tls_thumbprint is given only with tls_mode 'thumbprint', not {mode!r}")


def _no_login_in_host(host: str) -> str:
    """A host or URL without a login in it: ``user:password@`` would keep a password in a field
    that every answer and log line shows."""
    authority = host.split("://", 1)[-1].split("/", 1)[0]
    if "@" in authority:
        raise ValueError(
            "vcenter_host must not carry a login (user:password@); give username and password in their fields"
        )
    return host


VCenterHost = Annotated[str, Field(min_length=1, max_length=MAX_NAME), AfterValidator(_no_login_in_host)]


class CreateCredentialRequest(RequestModel):
    credential_name: str = Field(min_length=1, max_length=MAX_NAME)
    vcenter_host: VCenterHost
    username: str = Field(min_length=1, max_length=MAX_NAME)
    password: str = Field(min_length=1, max_length=1024)
    datacenter: str = Field("", max_length=MAX_NAME)
    is_active: bool = True
    is_default: bool = False
    tls_mode: TlsMode = "verify"
    tls_thumbprint: Thumbprint = ""

    @model_validator(mode="after")
    def _tls(self) -> Self:
        _check_tls(self.tls_mode, self.tls_thumbprint)
        return self


class UpdateCredentialRequest(RequestModel):
    credential_name: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    vcenter_host: VCenterHost | None = None
    username: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    password: str | None = Field(None, min_length=1, max_length=1024)
    datacenter: str | None = Field(None, max_length=MAX_NAME)
    is_active: bool | None = None
    #: Changing the mode: give ``tls_thumbprint`` with ``thumbprint``; another mode clears it.
    tls_mode: TlsMode | None = None
    tls_thumbprint: Thumbprint | None = None


@dataclass(frozen=True)
class VCenterLogin:
    credential_id: int | None
    vcenter: str
    username: str
    password: str = field(repr=False)
    datacenter: str
    tls_mode: str = "verify"
    tls_thumbprint: str = ""


async def _get(cred_id: int) -> Record:
    row = await state().db.fetchrow(f"SELECT {PUBLIC_COLUMNS} FROM vmware_credentials WHERE id = $1", cred_id)
    if row is None:
        raise ApiError.not_found(f"VMware credential {cred_id} not found")
    return row


async def resolve_login(credential_id: int | None) -> VCenterLogin:
    """The vCenter login of ``credential_id`` (the default one when None), password decrypted."""
    st = state()
    if credential_id is None:
        row = await st.db.fetchrow(
            "SELECT id, vcenter_host, username, datacenter, password_ciphertext, is_active, tls_mode,"
            " tls_thumbprint FROM vmware_credentials WHERE is_default"
        )
        if row is None:
            raise ApiError.unprocessable("no credential_id given and no default VMware credential is set")
    else:
        row = await st.db.fetchrow(
            "SELECT id, vcenter_host, username, datacenter, password_ciphertext, is_active, tls_mode,"
            " tls_thumbprint FROM vmware_credentials WHERE id = $1",
            credential_id,
        )
        if row is None:
            raise ApiError.not_found(f"VMware credential {credential_id} not found")
    if not row["is_active"]:
        raise ApiError.conflict(f"VMware credential {row['id']} is disabled")
    try:
        password = st.box.decrypt(row["password_ciphertext"], PURPOSE)
    except SecretBoxError as exc:
        raise ApiError(500, "OPERATION_FAILED", f"credential {row['id']} cannot be decrypted: {exc}") from exc
    await st.db.execute(
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


def _warn_insecure(cred_id: int, vcenter: str) -> None:
    log.warning(
        "VMware credential %s connects to vCenter %s without TLS verification (tls_mode insecure)",
        cred_id,
        vcenter,
        extra={"credential_id": cred_id, "vcenter": vcenter, "tls_mode": "insecure"},
    )


@bp.get("/vmware-credentials")
@requires("admin")
async def list_credentials() -> dict[str, Any]:
    rows = await state().db.fetch(f"SELECT {PUBLIC_COLUMNS} FROM vmware_credentials ORDER BY credential_name")
    return {"credentials": [row_dict(r) for r in rows], "count": len(rows)}


@bp.post("/vmware-credentials")
@requires("admin")
@validate_request(CreateCredentialRequest)
async def create_credential(data: CreateCredentialRequest) -> tuple[dict[str, Any], int]:
    st = state()
    ciphertext = st.box.encrypt(data.password, PURPOSE)
    try:
        async with st.db.transaction() as conn:
            if data.is_default:
                await conn.execute("UPDATE vmware_credentials SET is_default = false WHERE is_default")
            row = await conn.fetchrow(
                "INSERT INTO vmware_credentials (credential_name, vcenter_host, username,"
                " password_ciphertext, datacenter, is_active, is_default, created_by, tls_mode,"
                " tls_thumbprint)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                f" RETURNING {PUBLIC_COLUMNS}",
                data.credential_name,
                data.vcenter_host,
                data.username,
                ciphertext,
                data.datacenter,
                data.is_active,
                data.is_default,
                current_principal().subject,
                data.tls_mode,
                data.tls_thumbprint,
            )
    except UniqueViolation as exc:
        raise ApiError.conflict(f"a credential named {data.credential_name!r} already exists") from exc
    assert row is not None
    with log_context(action="credential_create"):
        log.info(
            "VMware credential created",
            extra={"credential_id": row["id"], "vcenter": data.vcenter_host, "tls_mode": data.tls_mode},
        )
        if data.tls_mode == "insecure":
            _warn_insecure(row["id"], data.vcenter_host)
    return row_dict(row), 201


@bp.get("/vmware-credentials/default")
@requires("admin")
async def get_default_credential() -> dict[str, Any]:
    row = await state().db.fetchrow(f"SELECT {PUBLIC_COLUMNS} FROM vmware_credentials WHERE is_default")
    if row is None:
        raise ApiError.not_found("no default VMware credential is set")
    return row_dict(row)


@bp.get("/vmware-credentials/<int:cred_id>")
@requires("admin")
async def get_credential(cred_id: int) -> dict[str, Any]:
    return row_dict(await _get(cred_id))


@bp.put("/vmware-credentials/<int:cred_id>")
@requires("admin")
@validate_request(UpdateCredentialRequest)
async def update_credential(cred_id: int, data: UpdateCredentialRequest) -> dict[str, Any]:
    st = state()
    if not data.model_dump(exclude_unset=True):
        raise ApiError.unprocessable("nothing to update")
    ciphertext = st.box.encrypt(data.password, PURPOSE) if data.password is not None else None
    mode, thumbprint = await _new_tls(cred_id, data)
    try:
        row = await st.db.fetchrow(
            "UPDATE vmware_credentials SET credential_name = COALESCE($2, credential_name),"
            " vcenter_host = COALESCE($3, vcenter_host), username = COALESCE($4, username),"
            " password_ciphertext = COALESCE($5, password_ciphertext), datacenter = COALESCE($6, datacenter),"
            " is_active = COALESCE($7, is_active), tls_mode = COALESCE($8, tls_mode),"
            " tls_thumbprint = COALESCE($9, tls_thumbprint), updated_at = now()"
            f" WHERE id = $1 RETURNING {PUBLIC_COLUMNS}",
            cred_id,
            data.credential_name,
            data.vcenter_host,
            data.username,
            ciphertext,
            data.datacenter,
            data.is_active,
            mode,
            thumbprint,
        )
    except UniqueViolation as exc:
        raise ApiError.conflict(f"a credential named {data.credential_name!r} already exists") from exc
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


async def _new_tls(cred_id: int, data: UpdateCredentialRequest) -> tuple[str | None, str | None]:
    """The ``(tls_mode, tls_thumbprint)`` an update sets (None: unchanged), checked together with
    what the credential has: a new mode other than ``thumbprint`` clears the thumbprint."""
    if data.tls_mode is None and data.tls_thumbprint is None:
        return None, None
    current = await _get(cred_id)
    mode = data.tls_mode or current["tls_mode"]
    if data.tls_thumbprint is not None:
        thumbprint = data.tls_thumbprint
    else:
        thumbprint = current["tls_thumbprint"] if mode == "thumbprint" else ""
    try:
        _check_tls(mode, thumbprint)
    except ValueError as exc:
        raise ApiError.unprocessable(str(exc)) from exc
    return mode, thumbprint


@bp.delete("/vmware-credentials/<int:cred_id>")
@requires("admin")
async def delete_credential(cred_id: int) -> dict[str, Any]:
    deleted = await state().db.fetchval("DELETE FROM vmware_credentials WHERE id = $1 RETURNING id", cred_id)
    if deleted is None:
        raise ApiError.not_found(f"VMware credential {cred_id} not found")
    with log_context(action="credential_delete"):
        log.info("VMware credential deleted", extra={"credential_id": cred_id})
    return {"message": "credential deleted", "id": cred_id}


@bp.put("/vmware-credentials/<int:cred_id>/set-default")
@requires("admin")
async def set_default_credential(cred_id: int) -> dict[str, Any]:
    async with state().db.transaction() as conn:
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
    return row_dict(await _get(cred_id))


@bp.post("/vmware-credentials/<int:cred_id>/test")
@requires("admin")
async def test_credential(cred_id: int) -> dict[str, Any]:
    st = state()
    await _get(cred_id)
    login = await resolve_login(cred_id)
    started = time.monotonic()
    try:
        result = await st.vma.discover(
            vcenter=login.vcenter,
            username=login.username,
            password=login.password,
            datacenter=login.datacenter,
            tls_mode=login.tls_mode,
            tls_thumbprint=login.tls_thumbprint,
        )
    except VmaUnreachable as exc:
        ok, message, vm_count = False, f"could not reach the VMA to test: {exc.message}", None
    except VmaError as exc:
        ok, message, vm_count = False, f"vCenter connection failed: {exc.message}", None
    else:
        ok, vm_count = True, len(result.vms)
        message = f"connected to {result.vcenter.host} ({result.vcenter.datacenter}); {vm_count} VMs visible"
    await st.db.execute(
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
