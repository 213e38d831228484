"""CloudStack settings and OSSEA configuration (the seed's "CloudStack (OSSEA) Settings" and "OSSEA
Config"): HTTP only — parse, call one function of :mod:`oma.cloudstack.service`, answer.

Requests that talk to CloudStack take the login in the body (``api_url``, ``api_key``,
``secret_key``: a test before saving) or none of it (the active settings). The keys are never
part of an answer. Administrators only, but ``GET /settings/cloudstack/networks`` (viewers).
docs/cloudstack.md is the operator's guide.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field
from quart import Blueprint
from quart_schema import validate_querystring, validate_request

from oma.api.access import current_principal, requires
from oma.api.requests import MAX_NAME, QueryModel, RequestModel, SerialId
from oma.cloudstack import service
from oma.cloudstack.service import LoginFields
from oma.cloudstack.settings import DEFAULT_NAME, ApiKey, ApiUrl, CloudStackId, DomainName
from oma.state import state

settings_bp = Blueprint("cloudstack_settings", __name__)
ossea_bp = Blueprint("ossea", __name__)

#: ``api_url`` also answers to ``base_url`` (the streamlined settings page's name for it).
_URL_NAMES = AliasChoices("api_url", "base_url")


class LoginRequest(RequestModel):
    """A CloudStack login — all three fields — or nothing: the active settings."""

    api_url: ApiUrl | None = Field(None, description="http(s)://host:port[/client/api]")
    api_key: ApiKey | None = None
    secret_key: ApiKey | None = None

    def login(self) -> LoginFields:
        return LoginFields(self.api_url, self.api_key, self.secret_key)


class DiscoverRequest(LoginRequest):
    api_url: ApiUrl | None = Field(None, validation_alias=_URL_NAMES)
    domain: DomainName = Field("", description="a domain's name or path: only that domain is listed")


class ValidateRequest(LoginRequest):
    zone_id: CloudStackId | None = None
    disk_offering_id: CloudStackId | None = None
    service_offering_id: CloudStackId | None = None
    network_id: CloudStackId | None = None
    template_id: CloudStackId | None = None
    oma_vm_id: CloudStackId | None = None

    def choices(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in _CHOICES}


_CHOICES = ("zone_id", "disk_offering_id", "service_offering_id", "network_id", "template_id", "oma_vm_id")


class NetworksQuery(QueryModel):
    zone_id: CloudStackId = ""


class ConfigFields(RequestModel):
    """Settings as ``POST /ossea/config`` takes them (create: ``name``, ``api_url``, ``api_key``,
    ``secret_key`` at least; update: what changes)."""

    name: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    api_url: ApiUrl | None = None
    api_key: ApiKey | None = None
    secret_key: ApiKey | None = None
    domain: DomainName | None = None
    zone_id: CloudStackId | None = None
    template_id: CloudStackId | None = None
    network_id: CloudStackId | None = None
    service_offering_id: CloudStackId | None = None
    disk_offering_id: CloudStackId | None = None
    oma_vm_id: CloudStackId | None = None
    is_active: bool | None = None


class ConfigOperation(RequestModel):
    action: Literal["get", "create", "update", "delete", "test"]
    id: SerialId | None = None
    config: ConfigFields | None = None
    #: create and update: check the settings with CloudStack before saving them.
    verify: bool = True


class StreamlinedConfigRequest(RequestModel):
    name: str = Field(DEFAULT_NAME, min_length=1, max_length=MAX_NAME)
    api_url: ApiUrl | None = Field(None, validation_alias=_URL_NAMES)
    api_key: ApiKey | None = None
    secret_key: ApiKey | None = None
    zone_id: CloudStackId
    disk_offering_id: CloudStackId
    service_offering_id: CloudStackId | None = None
    network_id: CloudStackId | None = None
    template_id: CloudStackId | None = None
    oma_vm_id: CloudStackId | None = Field(None, description="left out: detected by this host's addresses")
    domain: DomainName | None = Field(None, validation_alias=AliasChoices("domain", "domain_name"))
    verify: bool = True


# --- CloudStack (OSSEA) Settings ---------------------------------------------------------------


@settings_bp.post("/settings/cloudstack/test-connection")
@requires("admin")
@validate_request(LoginRequest)
async def test_connection(data: LoginRequest) -> dict[str, Any]:
    st = state()
    return await service.test_connection(st.db, st.box, st.config, data.login())


@settings_bp.post("/settings/cloudstack/detect-oma-vm")
@requires("admin")
@validate_request(LoginRequest)
async def detect_oma_vm(data: LoginRequest) -> dict[str, Any]:
    st = state()
    return await service.detect(st.db, st.box, st.config, data.login())


@settings_bp.get("/settings/cloudstack/networks")
@requires("viewer")
@validate_querystring(NetworksQuery)
async def list_networks(query_args: NetworksQuery) -> dict[str, Any]:
    st = state()
    return await service.settings_networks(st.db, st.box, st.config, query_args.zone_id)


@settings_bp.post("/settings/cloudstack/validate")
@requires("admin")
@validate_request(ValidateRequest)
async def validate_settings(data: ValidateRequest) -> dict[str, Any]:
    st = state()
    return await service.validate_settings(st.db, st.box, st.config, data.login(), data.choices())


@settings_bp.post("/settings/cloudstack/discover-all")
@requires("admin")
@validate_request(DiscoverRequest)
async def discover_all(data: DiscoverRequest) -> dict[str, Any]:
    st = state()
    return await service.discover_all(st.db, st.box, st.config, data.login(), data.domain)


# --- OSSEA Config ------------------------------------------------------------------------------


@ossea_bp.post("/ossea/config")
@requires("admin")
@validate_request(ConfigOperation)
async def ossea_config(data: ConfigOperation) -> tuple[dict[str, Any], int]:
    st = state()
    return await service.ossea_config(
        st.db,
        st.box,
        st.config,
        action=data.action,
        config_id=data.id,
        fields=data.config.model_dump(exclude_unset=True) if data.config is not None else None,
        verify=data.verify,
        actor=current_principal().subject,
    )


@ossea_bp.post("/ossea/discover-resources")
@requires("admin")
@validate_request(DiscoverRequest)
async def discover_resources(data: DiscoverRequest) -> dict[str, Any]:
    st = state()
    return await service.discover_resources(st.db, st.box, st.config, data.login(), data.domain)


@ossea_bp.post("/ossea/config-streamlined")
@requires("admin")
@validate_request(StreamlinedConfigRequest)
async def config_streamlined(data: StreamlinedConfigRequest) -> dict[str, Any]:
    st = state()
    choices = {name: getattr(data, name) for name in (*_CHOICES, "domain")}
    return await service.save_streamlined(
        st.db,
        st.box,
        st.config,
        name=data.name,
        given=LoginFields(data.api_url, data.api_key, data.secret_key),
        chosen=choices,
        verify=data.verify,
        actor=current_principal().subject,
    )
