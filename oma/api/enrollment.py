"""VMA enrollment: how a new VMA gets its own login on the OMA.

1. an administrator creates a pairing code (``POST /admin/vma/pairing-code``): 12 characters from
   an unambiguous alphabet, shown once, stored as a sha256 digest, single-use, expiring
   (10 minutes by default);
2. the VMA enrolls (``POST /vma/enroll``) with the code, its name, version, fingerprint and its
   ed25519 SSH public key; the code is consumed atomically and the VMA receives a random challenge;
3. the VMA proves it holds the private key (``POST /vma/enroll/verify``: ed25519 signature of the
   challenge, base64); the enrollment now awaits approval;
4. an administrator approves (or rejects) it; approval issues an appliance id (``vma-…``) and a
   random secret: the secret is stored argon2-hashed for login, and encrypted until the VMA fetches
   it once through ``GET /vma/enroll/result`` (which again requires the challenge signature);
5. the VMA logs in with ``POST /auth/login`` (``username`` = appliance id, ``password`` = secret).
   ``DELETE /admin/vma/revoke/{id}`` revokes it: its tokens are revoked in the same transaction and
   token checks also require an approved enrollment, so the next request already gets 401.

Every step is written to ``vma_audit_log``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import logging
import secrets
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from pydantic import Field
from quart import Blueprint
from quart_schema import validate_querystring, validate_request

from oma.api.access import current_principal, public, requires
from oma.api.requests import MAX_NAME, PageQuery, QueryModel, RequestModel, client_ip
from oma.crypto import SecretBoxError, hash_password
from oma.state import state
from oma.store.pages import page_body
from oma.store.rows import iso, new_id, row_dict
from pyapp.api import ApiError
from pyapp.db import Connection, Database
from pyapp.logs import log_context

log = logging.getLogger(__name__)
admin_bp = Blueprint("enrollment_admin", __name__)
public_bp = Blueprint("enrollment_public", __name__)

CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I
CODE_LENGTH = 12
SECRET_PURPOSE = b"vma-secret"
PENDING = ("pending_verification", "awaiting_approval")
ENROLLMENT_COLUMNS = (
    "id, vma_name, vma_version, vma_fingerprint, status, created_at, verified_at, decided_at, decided_by,"
    " decision_reason, revoked_at, appliance_id, secret_delivered_at"
)


class PairingCodeRequest(RequestModel):
    ttl_seconds: int | None = Field(None, ge=60, le=7 * 24 * 3600)


class DecisionRequest(RequestModel):
    reason: str | None = Field(None, max_length=1024)


class EnrollRequest(RequestModel):
    pairing_code: str = Field(min_length=CODE_LENGTH, max_length=32)
    vma_public_key: str = Field(min_length=16, max_length=4096, description="OpenSSH ed25519 public key")
    vma_name: str = Field(min_length=1, max_length=MAX_NAME)
    vma_version: str = Field(min_length=1, max_length=64)
    vma_fingerprint: str = Field(min_length=1, max_length=MAX_NAME)


class VerifyRequest(RequestModel):
    enrollment_id: str = Field(min_length=1, max_length=64)
    signature: str = Field(
        min_length=1, max_length=512, description="base64 ed25519 signature of the challenge"
    )


class ResultQuery(QueryModel):
    enrollment_id: str = Field(min_length=1, max_length=64)
    signature: str = Field(min_length=1, max_length=512)


class AuditQuery(PageQuery):
    enrollment_id: str | None = Field(None, max_length=64)


def normalize_code(code: str) -> str:
    return "".join(ch for ch in code.upper() if ch.isalnum())


def code_digest(code: str) -> bytes:
    return hashlib.sha256(normalize_code(code).encode("ascii", "replace")).digest()


def _format_code(raw: str) -> str:
    return "-".join(raw[i : i + 4] for i in range(0, len(raw), 4))


async def audit(
    db: Database | Connection, event: str, actor: str, enrollment_id: str | None, **details: Any
) -> None:
    await db.execute(
        "INSERT INTO vma_audit_log (enrollment_id, event_type, actor, details, client_ip)"
        " VALUES ($1, $2, $3, $4::jsonb, $5)",
        enrollment_id,
        event,
        actor,
        json.dumps(details),
        client_ip(),
    )


def _verify_signature(public_key: str, challenge: str, signature_b64: str) -> bool:
    try:
        key = load_ssh_public_key(public_key.encode("ascii"))
        signature = base64.b64decode(signature_b64, validate=True)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        return False
    if not isinstance(key, Ed25519PublicKey):
        return False
    try:
        key.verify(signature, challenge.encode("ascii"))
    except InvalidSignature:
        return False
    return True


# --- administrators ---------------------------------------------------------------------------


@admin_bp.post("/admin/vma/pairing-code")
@requires("admin")
@validate_request(PairingCodeRequest)
async def create_pairing_code(data: PairingCodeRequest) -> tuple[dict[str, Any], int]:
    st = state()
    actor = current_principal().subject
    ttl = data.ttl_seconds or st.config.pairing_code_ttl_seconds
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
    expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=ttl)
    async with st.db.transaction() as conn:
        code_id = await conn.fetchval(
            "INSERT INTO vma_pairing_codes (code_hash, created_by, expires_at) VALUES ($1, $2, $3) "
            "RETURNING id",
            code_digest(raw),
            actor,
            expires_at,
        )
        await audit(conn, "pairing_code_created", actor, None, pairing_code_id=code_id, ttl_seconds=ttl)
    return {"pairing_code": _format_code(raw), "expires_at": iso(expires_at), "valid_for": ttl}, 201


@admin_bp.get("/admin/vma/pending")
@requires("admin")
async def list_pending() -> dict[str, Any]:
    rows = await state().db.fetch(
        f"SELECT {ENROLLMENT_COLUMNS} FROM vma_enrollments WHERE status = ANY($1::text[]) ORDER BY "
        "created_at",
        list(PENDING),
    )
    return {"enrollments": [row_dict(r) for r in rows], "count": len(rows)}


@admin_bp.get("/admin/vma/active")
@requires("admin")
async def list_active() -> dict[str, Any]:
    rows = await state().db.fetch(
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


@admin_bp.post("/admin/vma/approve/<enrollment_id>")
@requires("admin")
@validate_request(DecisionRequest)
async def approve(enrollment_id: str, data: DecisionRequest) -> dict[str, Any]:
    st = state()
    actor = current_principal().subject
    secret = secrets.token_urlsafe(32)
    secret_hash = await hash_password(secret)
    appliance_id = f"vma-{secrets.token_hex(6)}"
    async with st.db.transaction() as conn:
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
            data.reason,
            appliance_id,
            secret_hash,
            st.box.encrypt(secret, SECRET_PURPOSE),
        )
        await audit(conn, "approved", actor, enrollment_id, appliance_id=appliance_id, reason=data.reason)
        enrollment = await _locked_enrollment(conn, enrollment_id)
    with log_context(action="vma_approve"):
        log.info(
            "VMA enrollment approved", extra={"enrollment_id": enrollment_id, "appliance_id": appliance_id}
        )
    return enrollment


@admin_bp.post("/admin/vma/reject/<enrollment_id>")
@requires("admin")
@validate_request(DecisionRequest)
async def reject(enrollment_id: str, data: DecisionRequest) -> dict[str, Any]:
    actor = current_principal().subject
    async with state().db.transaction() as conn:
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
            data.reason,
        )
        await audit(conn, "rejected", actor, enrollment_id, reason=data.reason)
        enrollment = await _locked_enrollment(conn, enrollment_id)
    return enrollment


@admin_bp.delete("/admin/vma/revoke/<enrollment_id>")
@requires("admin")
async def revoke(enrollment_id: str) -> dict[str, Any]:
    actor = current_principal().subject
    async with state().db.transaction() as conn:
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
        await audit(conn, "revoked", actor, enrollment_id, tokens_revoked=int(tokens.split()[-1]))
        enrollment = await _locked_enrollment(conn, enrollment_id)
    with log_context(action="vma_revoke"):
        log.info("VMA revoked", extra={"enrollment_id": enrollment_id})
    return enrollment


@admin_bp.get("/admin/vma/audit")
@requires("admin")
@validate_querystring(AuditQuery)
async def audit_log(query_args: AuditQuery) -> dict[str, Any]:
    db = state().db
    rows = await db.fetch(
        "SELECT id, enrollment_id, event_type, actor, details, client_ip, created_at FROM vma_audit_log"
        " WHERE ($1::text IS NULL OR enrollment_id = $1) ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET "
        "$3",
        query_args.enrollment_id,
        query_args.limit,
        query_args.offset,
    )
    total = await db.fetchval(
        "SELECT count(*) FROM vma_audit_log WHERE ($1::text IS NULL OR enrollment_id = $1)",
        query_args.enrollment_id,
    )
    return page_body("events", [row_dict(r) for r in rows], total, query_args)


# --- the VMA (no token yet: the pairing code and the key signature authenticate it) -----------


@public_bp.post("/vma/enroll")
@public
@validate_request(EnrollRequest)
async def enroll(data: EnrollRequest) -> tuple[dict[str, Any], int]:
    try:
        key = load_ssh_public_key(data.vma_public_key.strip().encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise ApiError.unprocessable("vma_public_key is not an OpenSSH public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ApiError.unprocessable("vma_public_key must be an ed25519 key")
    enrollment_id = new_id("enr")
    challenge = secrets.token_urlsafe(32)
    async with state().db.transaction() as conn:
        code_id = await conn.fetchval(
            "UPDATE vma_pairing_codes SET used_at = now()"
            " WHERE code_hash = $1 AND used_at IS NULL AND expires_at > now() RETURNING id",
            code_digest(data.pairing_code),
        )
        if code_id is None:
            raise ApiError.unauthorized("invalid, expired or already used pairing code")
        await conn.execute(
            "INSERT INTO vma_enrollments (id, pairing_code_id, vma_name, vma_version, vma_fingerprint,"
            " public_key, challenge, status) VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending_verification')",
            enrollment_id,
            code_id,
            data.vma_name,
            data.vma_version,
            data.vma_fingerprint,
            data.vma_public_key.strip(),
            challenge,
        )
        await audit(conn, "enrolled", data.vma_name, enrollment_id, vma_version=data.vma_version)
    return {"enrollment_id": enrollment_id, "challenge": challenge, "status": "pending_verification"}, 201


@public_bp.post("/vma/enroll/verify")
@public
@validate_request(VerifyRequest)
async def verify(data: VerifyRequest) -> dict[str, Any]:
    async with state().db.transaction() as conn:
        row = await conn.fetchrow(
            "SELECT status, public_key, challenge, vma_name FROM vma_enrollments WHERE id = $1 FOR UPDATE",
            data.enrollment_id,
        )
        if row is None:
            raise ApiError.not_found("enrollment not found")
        if row["status"] != "pending_verification":
            raise ApiError.conflict(f"enrollment is {row['status']}")
        if not _verify_signature(row["public_key"], row["challenge"], data.signature):
            await audit(conn, "verification_failed", row["vma_name"], data.enrollment_id)
            raise ApiError.unauthorized("the signature does not verify with the enrolled key")
        await conn.execute(
            "UPDATE vma_enrollments SET status = 'awaiting_approval', verified_at = now() WHERE id = $1",
            data.enrollment_id,
        )
        await audit(conn, "verified", row["vma_name"], data.enrollment_id)
    return {"enrollment_id": data.enrollment_id, "status": "awaiting_approval"}


@public_bp.get("/vma/enroll/result")
@public
@validate_querystring(ResultQuery)
async def result(query_args: ResultQuery) -> dict[str, Any]:
    st = state()
    async with st.db.transaction() as conn:
        row = await conn.fetchrow(
            "SELECT status, public_key, challenge, vma_name, appliance_id, secret_ciphertext, decision_reason"
            " FROM vma_enrollments WHERE id = $1 FOR UPDATE",
            query_args.enrollment_id,
        )
        if row is None or not _verify_signature(row["public_key"], row["challenge"], query_args.signature):
            # same answer for "unknown id" and "bad signature": nothing to learn by probing
            raise ApiError.unauthorized("unknown enrollment or signature does not verify")
        body: dict[str, Any] = {"enrollment_id": query_args.enrollment_id, "status": row["status"]}
        if row["status"] == "rejected":
            body["reason"] = row["decision_reason"]
        if row["status"] == "approved":
            body["appliance_id"] = row["appliance_id"]
            body["login_path"] = "/api/v1/auth/login"
            if row["secret_ciphertext"] is not None:
                try:
                    body["secret"] = st.box.decrypt(row["secret_ciphertext"], SECRET_PURPOSE)
                except SecretBoxError as exc:
                    raise ApiError(500, "OPERATION_FAILED", "the issued secret cannot be decrypted") from exc
                await conn.execute(
                    "UPDATE vma_enrollments SET secret_ciphertext = NULL, secret_delivered_at = now() "
                    "WHERE id = $1",
                    query_args.enrollment_id,
                )
                await audit(conn, "credentials_delivered", row["vma_name"], query_args.enrollment_id)
            else:
                body["secret"] = None
                body["message"] = "credentials were already delivered; ask an administrator to re-enroll"
    return body
