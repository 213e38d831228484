"""VMA enrollment over HTTP (:mod:`oma.enrollment` holds the protocol and its rules).

Administrators: ``POST /admin/vma/pairing-code``, ``GET /admin/vma/pending``, ``GET
/admin/vma/active``, ``POST /admin/vma/approve/{id}``, ``POST /admin/vma/reject/{id}``, ``DELETE
/admin/vma/revoke/{id}``, ``GET /admin/vma/audit``. The VMA, before it has a token (the pairing
code and the signature of its challenge authenticate it): ``POST /vma/enroll``, ``POST
/vma/enroll/verify``, ``GET /vma/enroll/result``; then ``POST /auth/login`` with the appliance id
and secret.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from quart import Blueprint
from quart_schema import validate_querystring, validate_request

from oma.api.access import current_principal, public, requires
from oma.api.requests import MAX_NAME, PageQuery, QueryModel, RequestModel, client_ip
from oma.enrollment import codes, enrollments
from oma.enrollment.audit import audit_page
from oma.state import state

admin_bp = Blueprint("enrollment_admin", __name__)
public_bp = Blueprint("enrollment_public", __name__)


class PairingCodeRequest(RequestModel):
    ttl_seconds: int | None = Field(None, ge=60, le=7 * 24 * 3600)


class DecisionRequest(RequestModel):
    reason: str | None = Field(None, max_length=1024)


class EnrollRequest(RequestModel):
    pairing_code: str = Field(min_length=codes.CODE_LENGTH, max_length=32)
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


# --- administrators ---------------------------------------------------------------------------


@admin_bp.post("/admin/vma/pairing-code")
@requires("admin")
@validate_request(PairingCodeRequest)
async def create_pairing_code(data: PairingCodeRequest) -> tuple[dict[str, Any], int]:
    st = state()
    ttl = data.ttl_seconds or st.config.pairing_code_ttl_seconds
    body = await codes.create_pairing_code(
        st.db, actor=current_principal().subject, ttl_seconds=ttl, client_ip=client_ip()
    )
    return body, 201


@admin_bp.get("/admin/vma/pending")
@requires("admin")
async def list_pending() -> dict[str, Any]:
    return await enrollments.list_pending(state().db)


@admin_bp.get("/admin/vma/active")
@requires("admin")
async def list_active() -> dict[str, Any]:
    return await enrollments.list_active(state().db)


@admin_bp.post("/admin/vma/approve/<enrollment_id>")
@requires("admin")
@validate_request(DecisionRequest)
async def approve(enrollment_id: str, data: DecisionRequest) -> dict[str, Any]:
    st = state()
    return await enrollments.approve(
        st.db,
        st.box,
        enrollment_id,
        actor=current_principal().subject,
        reason=data.reason,
        client_ip=client_ip(),
        config=st.config,
    )


@admin_bp.post("/admin/vma/reject/<enrollment_id>")
@requires("admin")
@validate_request(DecisionRequest)
async def reject(enrollment_id: str, data: DecisionRequest) -> dict[str, Any]:
    return await enrollments.reject(
        state().db,
        enrollment_id,
        actor=current_principal().subject,
        reason=data.reason,
        client_ip=client_ip(),
    )


@admin_bp.delete("/admin/vma/revoke/<enrollment_id>")
@requires("admin")
async def revoke(enrollment_id: str) -> dict[str, Any]:
    st = state()
    return await enrollments.revoke(
        st.db, enrollment_id, actor=current_principal().subject, client_ip=client_ip(), config=st.config
    )


@admin_bp.get("/admin/vma/audit")
@requires("admin")
@validate_querystring(AuditQuery)
async def audit_log(query_args: AuditQuery) -> dict[str, Any]:
    return await audit_page(state().db, query_args.enrollment_id, query_args)


# --- the VMA (no token yet: the pairing code and the key signature authenticate it) -----------


@public_bp.post("/vma/enroll")
@public
@validate_request(EnrollRequest)
async def enroll(data: EnrollRequest) -> tuple[dict[str, Any], int]:
    body = await enrollments.enroll(
        state().db,
        pairing_code=data.pairing_code,
        public_key=data.vma_public_key,
        vma_name=data.vma_name,
        vma_version=data.vma_version,
        vma_fingerprint=data.vma_fingerprint,
        client_ip=client_ip(),
    )
    return body, 201


@public_bp.post("/vma/enroll/verify")
@public
@validate_request(VerifyRequest)
async def verify(data: VerifyRequest) -> dict[str, Any]:
    return await enrollments.verify(state().db, data.enrollment_id, data.signature, client_ip=client_ip())


@public_bp.get("/vma/enroll/result")
@public
@validate_querystring(ResultQuery)
async def result(query_args: ResultQuery) -> dict[str, Any]:
    st = state()
    return await enrollments.result(
        st.db,
        st.box,
        query_args.enrollment_id,
        query_args.signature,
        client_ip=client_ip(),
        config=st.config,
    )
