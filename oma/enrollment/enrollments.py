"""Enrollments (``vma_enrollments``) and their states: ``pending_verification`` (enrolled with a
pairing code) → ``awaiting_approval`` (the challenge signature verified) → ``approved`` (an
appliance id and secret issued) or ``rejected``; ``approved`` → ``revoked``.

The VMA's steps (:func:`enroll`, :func:`verify`, :func:`result`) are authenticated by the pairing
code and by the signature of the challenge; the administrators' steps (:func:`approve`,
:func:`reject`, :func:`revoke`) lock the enrollment's row and record who decided.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import trio

from oma.config import OmaConfig
from oma.crypto import SecretBox, SecretBoxError, hash_password
from oma.enrollment.audit import audit
from oma.enrollment.codes import code_digest
from oma.enrollment.keys import check_public_key, signature_verifies
from oma.enrollment.sshd import end_sessions, install_key, remove_key, settings_from, tunnel_for_vma
from oma.store.rows import new_id, row_dict
from pyapp.api import ApiError
from pyapp.atomic_file import write_atomic
from pyapp.db import Connection, Database
from pyapp.logs import log_context

log = logging.getLogger(__name__)

SECRET_PURPOSE = b"vma-secret"
PENDING = ("pending_verification", "awaiting_approval")
ENROLLMENT_COLUMNS = (
    "id, vma_name, vma_version, vma_fingerprint, status, created_at, verified_at, decided_at, decided_by,"
    " decision_reason, revoked_at, appliance_id, secret_delivered_at"
)


# --- administrators ---------------------------------------------------------------------------


async def list_pending(db: Database) -> dict[str, Any]:
    rows = await db.fetch(
        f"SELECT {ENROLLMENT_COLUMNS} FROM vma_enrollments WHERE status = ANY($1::text[]) ORDER BY "
        "created_at",
        list(PENDING),
    )
    return {"enrollments": [row_dict(r) for r in rows], "count": len(rows)}


async def list_active(db: Database) -> dict[str, Any]:
    rows = await db.fetch(
        f"SELECT {ENROLLMENT_COLUMNS} FROM vma_enrollments WHERE status = 'approved' ORDER BY decided_at"
    )
    return {"vmas": [row_dict(r) for r in rows], "count": len(rows)}


async def _locked_enrollment(conn: Connection, enrollment_id: str) -> dict[str, Any]:
    row = await conn.fetchrow(
        f"SELECT {ENROLLMENT_COLUMNS} FROM vma_enrollments WHERE id = $1 FOR UPDATE", enrollment_id
    )
    if row is None:
        raise ApiError.not_found(f"enrollment {enrollment_id!r} not found")
    return row_dict(row)


async def approve(
    db: Database,
    box: SecretBox,
    enrollment_id: str,
    *,
    actor: str,
    reason: str | None,
    client_ip: str | None,
    config: OmaConfig | None = None,
) -> dict[str, Any]:
    """Issue the appliance id and secret of an enrollment awaiting approval. With a ``config``:
    the VMA's key goes into the tunnel's ``authorized_keys`` and the secret into the OMA's
    ``vma_secret_file`` (it signs its requests to the VMA with it), both before the commit, so a
    failure leaves the enrollment awaiting approval."""
    secret = secrets.token_urlsafe(32)
    secret_hash = await hash_password(secret)
    appliance_id = f"vma-{secrets.token_hex(6)}"
    async with db.transaction() as conn:
        enrollment = await _locked_enrollment(conn, enrollment_id)
        if enrollment["status"] != "awaiting_approval":
            raise ApiError.conflict(
                f"enrollment is {enrollment['status']}; only awaiting_approval can be approved"
            )
        await conn.execute(
            "UPDATE vma_enrollments SET status = 'approved', decided_at = now(), decided_by = $2,"
            " decision_reason = $3, appliance_id = $4, secret_hash = $5, secret_ciphertext = $6 WHERE id = "
            "$1",
            enrollment_id,
            actor,
            reason,
            appliance_id,
            secret_hash,
            box.encrypt(secret, SECRET_PURPOSE),
        )
        await audit(
            conn,
            "approved",
            actor,
            enrollment_id,
            client_ip=client_ip,
            appliance_id=appliance_id,
            reason=reason,
        )
        enrollment = await _locked_enrollment(conn, enrollment_id)
        if config is not None:
            tunnel = settings_from(config)
            if tunnel is not None:
                public_key = await conn.fetchval(
                    "SELECT public_key FROM vma_enrollments WHERE id = $1", enrollment_id
                )
                await trio.to_thread.run_sync(install_key, tunnel, enrollment_id, public_key)
            if config.vma_secret_file is not None:
                await trio.to_thread.run_sync(write_atomic, config.vma_secret_file, f"{secret}\n".encode())
    with log_context(action="vma_approve"):
        log.info(
            "VMA enrollment approved", extra={"enrollment_id": enrollment_id, "appliance_id": appliance_id}
        )
    return enrollment


async def reject(
    db: Database, enrollment_id: str, *, actor: str, reason: str | None, client_ip: str | None
) -> dict[str, Any]:
    async with db.transaction() as conn:
        enrollment = await _locked_enrollment(conn, enrollment_id)
        if enrollment["status"] not in PENDING:
            raise ApiError.conflict(
                f"enrollment is {enrollment['status']}; only a pending one can be rejected"
            )
        await conn.execute(
            "UPDATE vma_enrollments SET status = 'rejected', decided_at = now(), decided_by = $2,"
            " decision_reason = $3 WHERE id = $1",
            enrollment_id,
            actor,
            reason,
        )
        await audit(conn, "rejected", actor, enrollment_id, client_ip=client_ip, reason=reason)
        enrollment = await _locked_enrollment(conn, enrollment_id)
    return enrollment


async def revoke(
    db: Database,
    enrollment_id: str,
    *,
    actor: str,
    client_ip: str | None,
    config: OmaConfig | None = None,
) -> dict[str, Any]:
    """Revoke an approved VMA: its secret is dropped and its tokens revoked in one transaction.
    With a ``config``: its key leaves the tunnel's ``authorized_keys`` and its open tunnel session
    is ended."""
    async with db.transaction() as conn:
        enrollment = await _locked_enrollment(conn, enrollment_id)
        if enrollment["status"] != "approved":
            raise ApiError.conflict(
                f"enrollment is {enrollment['status']}; only an approved VMA can be revoked"
            )
        await conn.execute(
            "UPDATE vma_enrollments SET status = 'revoked', revoked_at = now(), secret_ciphertext = NULL"
            " WHERE id = $1",
            enrollment_id,
        )
        tokens = await conn.execute(
            "UPDATE auth_tokens SET revoked_at = now() WHERE vma_id = $1 AND revoked_at IS NULL",
            enrollment_id,
        )
        await audit(
            conn,
            "revoked",
            actor,
            enrollment_id,
            client_ip=client_ip,
            tokens_revoked=int(tokens.split()[-1]),
        )
        enrollment = await _locked_enrollment(conn, enrollment_id)
        public_key = await conn.fetchval(
            "SELECT public_key FROM vma_enrollments WHERE id = $1", enrollment_id
        )
    tunnel = settings_from(config) if config is not None else None
    if tunnel is not None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(remove_key, tunnel, enrollment_id)
            await trio.to_thread.run_sync(end_sessions, tunnel, public_key)
    with log_context(action="vma_revoke"):
        log.info("VMA revoked", extra={"enrollment_id": enrollment_id})
    return enrollment


# --- the VMA (no token yet: the pairing code and the key signature authenticate it) -----------


async def enroll(
    db: Database,
    *,
    pairing_code: str,
    public_key: str,
    vma_name: str,
    vma_version: str,
    vma_fingerprint: str,
    client_ip: str | None,
) -> dict[str, Any]:
    """Consume the pairing code and record the enrollment; the answer holds the challenge the
    VMA signs next."""
    public_key = public_key.strip()
    check_public_key(public_key)
    enrollment_id = new_id("enr")
    challenge = secrets.token_urlsafe(32)
    async with db.transaction() as conn:
        code_id = await conn.fetchval(
            "UPDATE vma_pairing_codes SET used_at = now()"
            " WHERE code_hash = $1 AND used_at IS NULL AND expires_at > now() RETURNING id",
            code_digest(pairing_code),
        )
        if code_id is None:
            raise ApiError.unauthorized("invalid, expired or already used pairing code")
        await conn.execute(
            "INSERT INTO vma_enrollments (id, pairing_code_id, vma_name, vma_version, vma_fingerprint,"
            " public_key, challenge, status) VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending_verification')",
            enrollment_id,
            code_id,
            vma_name,
            vma_version,
            vma_fingerprint,
            public_key,
            challenge,
        )
        await audit(conn, "enrolled", vma_name, enrollment_id, client_ip=client_ip, vma_version=vma_version)
    return {"enrollment_id": enrollment_id, "challenge": challenge, "status": "pending_verification"}


async def verify(
    db: Database, enrollment_id: str, signature: str, *, client_ip: str | None
) -> dict[str, Any]:
    """Check the challenge's signature: the enrollment then awaits approval."""
    async with db.transaction() as conn:
        row = await conn.fetchrow(
            "SELECT status, public_key, challenge, vma_name FROM vma_enrollments WHERE id = $1 FOR UPDATE",
            enrollment_id,
        )
        if row is None:
            raise ApiError.not_found("enrollment not found")
        if row["status"] != "pending_verification":
            raise ApiError.conflict(f"enrollment is {row['status']}")
        if not signature_verifies(row["public_key"], row["challenge"], signature):
            await audit(conn, "verification_failed", row["vma_name"], enrollment_id, client_ip=client_ip)
            raise ApiError.unauthorized("the signature does not verify with the enrolled key")
        await conn.execute(
            "UPDATE vma_enrollments SET status = 'awaiting_approval', verified_at = now() WHERE id = $1",
            enrollment_id,
        )
        await audit(conn, "verified", row["vma_name"], enrollment_id, client_ip=client_ip)
    return {"enrollment_id": enrollment_id, "status": "awaiting_approval"}


async def result(
    db: Database,
    box: SecretBox,
    enrollment_id: str,
    signature: str,
    *,
    client_ip: str | None,
    config: OmaConfig | None = None,
) -> dict[str, Any]:
    """The enrollment's state for the VMA that signs its challenge; once approved, the appliance
    id, the tunnel's parameters when the OMA has a tunnel, and — the first time only — the
    secret."""
    async with db.transaction() as conn:
        row = await conn.fetchrow(
            "SELECT status, public_key, challenge, vma_name, appliance_id, secret_ciphertext, decision_reason"
            " FROM vma_enrollments WHERE id = $1 FOR UPDATE",
            enrollment_id,
        )
        if row is None or not signature_verifies(row["public_key"], row["challenge"], signature):
            # same answer for "unknown id" and "bad signature": nothing to learn by probing
            raise ApiError.unauthorized("unknown enrollment or signature does not verify")
        body: dict[str, Any] = {"enrollment_id": enrollment_id, "status": row["status"]}
        if row["status"] == "rejected":
            body["reason"] = row["decision_reason"]
        if row["status"] == "approved":
            body["appliance_id"] = row["appliance_id"]
            body["login_path"] = "/api/v1/auth/login"
            tunnel = settings_from(config) if config is not None else None
            if config is not None and tunnel is not None:
                body["tunnel"] = tunnel_for_vma(config, tunnel)
            if row["secret_ciphertext"] is not None:
                try:
                    body["secret"] = box.decrypt(row["secret_ciphertext"], SECRET_PURPOSE)
                except SecretBoxError as exc:
                    raise ApiError(500, "OPERATION_FAILED", "the issued secret cannot be decrypted") from exc
                await conn.execute(
                    "UPDATE vma_enrollments SET secret_ciphertext = NULL, secret_delivered_at = now() "
                    "WHERE id = $1",
                    enrollment_id,
                )
                await audit(
                    conn, "credentials_delivered", row["vma_name"], enrollment_id, client_ip=client_ip
                )
            else:
                body["secret"] = None
                body["message"] = "credentials were already delivered; ask an administrator to re-enroll"
    return body
