"""Network mappings and service offerings (the seed's "Network Mapping and Service Offerings"):
HTTP only — parse, call one function of :mod:`oma.cloudstack.service`, answer.

``{vm_id}`` is a managed VM's context id, VMware id or name (:mod:`oma.cloudstack.network_mappings`).
Making and deleting mappings needs an operator; reading them, a viewer.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import Field, model_validator
from quart import Blueprint, Response
from quart_schema import validate_querystring, validate_request

from oma.api.access import current_principal, requires
from oma.api.requests import MAX_NAME, PageQuery, QueryModel, RequestModel, json_response
from oma.cloudstack import service
from oma.cloudstack.settings import CloudStackId
from oma.state import state

bp = Blueprint("network_mappings", __name__)

MAX_RESOLVE = 100


class MappingRequest(RequestModel):
    vm_id: str | None = Field(
        None, min_length=1, max_length=MAX_NAME, description="context id, VMware id or name"
    )
    vm_context_id: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    source_network_name: str = Field(min_length=1, max_length=MAX_NAME)
    destination_network_id: CloudStackId = Field(min_length=1)
    #: Ignored when given: the name is CloudStack's (kept for the seed's clients, which send it).
    destination_network_name: str | None = Field(None, max_length=MAX_NAME)
    is_test_network: bool = False

    @model_validator(mode="after")
    def _one_vm(self) -> Self:
        if (self.vm_id is None) == (self.vm_context_id is None):
            raise ValueError("give vm_id or vm_context_id (one of them)")
        return self


class MappingListQuery(PageQuery):
    is_test_network: bool | None = None


class TestNetworkQuery(QueryModel):
    is_test_network: bool | None = None


class AvailableNetworksQuery(QueryModel):
    zone_id: CloudStackId | None = None


class ResolveRequest(RequestModel):
    network_name: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    network_names: list[str] | None = Field(None, min_length=1, max_length=MAX_RESOLVE)

    @model_validator(mode="after")
    def _names(self) -> Self:
        if (self.network_name is None) == (self.network_names is None):
            raise ValueError("give network_name or network_names (one of them)")
        if any(not n or len(n) > MAX_NAME for n in self.network_names or []):
            raise ValueError(f"network names are 1 to {MAX_NAME} characters")
        return self


@bp.post("/network-mappings")
@requires("operator")
@validate_request(MappingRequest)
async def create_mapping(data: MappingRequest) -> tuple[dict[str, Any], int]:
    st = state()
    mapping, created = await service.create_mapping(
        st.db,
        st.box,
        st.config,
        vm=data.vm_context_id or data.vm_id or "",
        source_network_name=data.source_network_name,
        destination_network_id=data.destination_network_id,
        is_test_network=data.is_test_network,
        actor=current_principal().subject,
    )
    return {"created": created, "mapping": mapping}, 201 if created else 200


@bp.get("/network-mappings")
@requires("viewer")
@validate_querystring(MappingListQuery)
async def list_mappings(query_args: MappingListQuery) -> Response:
    return json_response(await service.list_mappings(state().db, query_args, query_args.is_test_network))


@bp.get("/network-mappings/<vm_id>")
@requires("viewer")
async def vm_mappings(vm_id: str) -> dict[str, Any]:
    return await service.vm_mappings(state().db, vm_id)


@bp.get("/network-mappings/<vm_id>/status")
@requires("viewer")
async def mapping_status(vm_id: str) -> dict[str, Any]:
    st = state()
    return await service.mapping_status(st.db, st.box, st.config, vm_id)


# (string: spelled out: quart-schema reads "<a>/<path:b>" as one parameter in the OpenAPI path)
@bp.delete("/network-mappings/<string:vm_id>/<path:source_network_name>")
@requires("operator")
@validate_querystring(TestNetworkQuery)
async def delete_mapping(
    vm_id: str, source_network_name: str, query_args: TestNetworkQuery
) -> dict[str, Any]:
    return await service.delete_mapping(state().db, vm_id, source_network_name, query_args.is_test_network)


@bp.get("/networks/available")
@requires("viewer")
@validate_querystring(AvailableNetworksQuery)
async def available_networks(query_args: AvailableNetworksQuery) -> dict[str, Any]:
    st = state()
    return await service.available_networks(st.db, st.box, st.config, query_args.zone_id)


@bp.post("/networks/resolve")
@requires("viewer")
@validate_request(ResolveRequest)
async def resolve_networks(data: ResolveRequest) -> dict[str, Any]:
    st = state()
    if data.network_names is not None:
        return await service.resolve_networks(st.db, st.box, st.config, data.network_names)
    return await service.resolve_networks(st.db, st.box, st.config, [data.network_name or ""], single=True)


@bp.get("/service-offerings/available")
@requires("viewer")
async def available_service_offerings() -> dict[str, Any]:
    st = state()
    return await service.available_service_offerings(st.db, st.box, st.config)
