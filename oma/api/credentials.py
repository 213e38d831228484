"""VMware credentials management (administrators only): the HTTP side of
:mod:`oma.credentials.vmware`, which holds the rules (encryption at rest, TLS modes, the default
credential, testing through the VMA).

``POST .../test`` really connects: it asks the VMA to run a discovery with these credentials and
reports how many VMs it saw, or why it could not (VMA unreachable, vCenter refused, ...).
"""

from __future__ import annotations

from typing import Annotated, Any, Self

from pydantic import AfterValidator, Field, model_validator
from quart import Blueprint
from quart_schema import validate_request

from oma.api.access import current_principal, requires
from oma.api.requests import MAX_NAME, RequestModel
from oma.credentials import vmware
from oma.credentials.vmware import CredentialChanges, NewCredential, TlsMode, check_tls
from oma.state import state
from pyapp.api import ApiError
from pyapp.thumbprint import normalize_thumbprint

bp = Blueprint("credentials", __name__)


def _thumbprint(value: str) -> str:
    """The pinned thumbprint, normalised (:func:`pyapp.thumbprint.normalize_thumbprint`); "" for none."""
    return normalize_thumbprint(value) if value.strip() else ""


Thumbprint = Annotated[str, Field(max_length=200), AfterValidator(_thumbprint)]


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
        check_tls(self.tls_mode, self.tls_thumbprint)
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


@bp.get("/vmware-credentials")
@requires("admin")
async def list_credentials() -> dict[str, Any]:
    return await vmware.list_credentials(state().db)


@bp.post("/vmware-credentials")
@requires("admin")
@validate_request(CreateCredentialRequest)
async def create_credential(data: CreateCredentialRequest) -> tuple[dict[str, Any], int]:
    st = state()
    new = NewCredential(**data.model_dump())
    return await vmware.create_credential(st.db, st.box, new, current_principal().subject), 201


@bp.get("/vmware-credentials/default")
@requires("admin")
async def get_default_credential() -> dict[str, Any]:
    return await vmware.default_credential(state().db)


@bp.get("/vmware-credentials/<int:cred_id>")
@requires("admin")
async def get_credential(cred_id: int) -> dict[str, Any]:
    return await vmware.get_credential(state().db, cred_id)


@bp.put("/vmware-credentials/<int:cred_id>")
@requires("admin")
@validate_request(UpdateCredentialRequest)
async def update_credential(cred_id: int, data: UpdateCredentialRequest) -> dict[str, Any]:
    if not data.model_dump(exclude_unset=True):
        raise ApiError.unprocessable("nothing to update")
    st = state()
    changes = CredentialChanges(**data.model_dump())
    return await vmware.update_credential(st.db, st.box, cred_id, changes)


@bp.delete("/vmware-credentials/<int:cred_id>")
@requires("admin")
async def delete_credential(cred_id: int) -> dict[str, Any]:
    return await vmware.delete_credential(state().db, cred_id)


@bp.put("/vmware-credentials/<int:cred_id>/set-default")
@requires("admin")
async def set_default_credential(cred_id: int) -> dict[str, Any]:
    return await vmware.set_default_credential(state().db, cred_id)


@bp.post("/vmware-credentials/<int:cred_id>/test")
@requires("admin")
async def test_credential(cred_id: int) -> dict[str, Any]:
    st = state()
    return await vmware.try_login(st.db, st.box, st.vma, cred_id)
