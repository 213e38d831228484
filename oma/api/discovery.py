"""Discovery (enhanced): VMs found through the VMA's ``POST /api/v1/discover``, added to
management as VM contexts without creating any job (:mod:`oma.inventory.discovery`).

- ``discover-vms``: discover, refresh the inventory, optionally add every VM found
  (``create_context``);
- ``add-vms``: add the named VMs (every VM of a name, or one VM by inventory path);
- ``bulk-add``: add every VM matching the filter (optionally skipping powered-off ones);
- ``preview``: discover and tell which VMs are new, persisting nothing;
- ``ungrouped-vms``: contexts that belong to no machine group.

The vCenter login comes from a stored credential (``credential_id``, else the default one).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from quart import Blueprint
from quart_schema import validate_querystring, validate_request

from oma.api.access import requires
from oma.api.requests import MAX_NAME, PageQuery, RequestModel, SerialId
from oma.inventory import discovery
from oma.inventory.contexts import list_ungrouped
from oma.state import state

bp = Blueprint("discovery", __name__)


class DiscoverRequest(RequestModel):
    credential_id: SerialId | None = None
    filter: str = Field("", max_length=MAX_NAME, description="passed to the VMA's discover filter")
    create_context: bool = Field(False, description="also add every discovered VM to management")


class PreviewRequest(RequestModel):
    credential_id: SerialId | None = None
    filter: str = Field("", max_length=MAX_NAME)


class AddVMsRequest(RequestModel):
    credential_id: SerialId | None = None
    vm_names: list[str] = Field(min_length=1, max_length=1000)


class BulkAddRequest(RequestModel):
    credential_id: SerialId | None = None
    filter: str = Field("", max_length=MAX_NAME)
    exclude_powered_off: bool = False


@bp.post("/discovery/discover-vms")
@requires("operator")
@validate_request(DiscoverRequest)
async def discover_vms(data: DiscoverRequest) -> dict[str, Any]:
    st = state()
    return await discovery.discover_vms(
        st.db,
        st.box,
        st.vma,
        credential_id=data.credential_id,
        filter=data.filter,
        create_context=data.create_context,
    )


@bp.post("/discovery/add-vms")
@requires("operator")
@validate_request(AddVMsRequest)
async def add_vms(data: AddVMsRequest) -> dict[str, Any]:
    st = state()
    return await discovery.add_vms(
        st.db, st.box, st.vma, credential_id=data.credential_id, vm_names=data.vm_names
    )


@bp.post("/discovery/bulk-add")
@requires("operator")
@validate_request(BulkAddRequest)
async def bulk_add(data: BulkAddRequest) -> dict[str, Any]:
    st = state()
    return await discovery.bulk_add(
        st.db,
        st.box,
        st.vma,
        credential_id=data.credential_id,
        filter=data.filter,
        exclude_powered_off=data.exclude_powered_off,
    )


@bp.post("/discovery/preview")
@requires("operator")
@validate_request(PreviewRequest)
async def preview(data: PreviewRequest) -> dict[str, Any]:
    st = state()
    return await discovery.preview(
        st.db, st.box, st.vma, credential_id=data.credential_id, filter=data.filter
    )


@bp.get("/discovery/ungrouped-vms")
@requires("viewer")
@validate_querystring(PageQuery)
async def ungrouped_vms(query_args: PageQuery) -> dict[str, Any]:
    return await list_ungrouped(state().db, query_args)
