"""The request bodies of the VMA's API as pydantic models: they document the bodies in the OpenAPI
document (``GET /api/v1/openapi.json``) and name the fields each body may have — a field not
listed is refused (400 ``INVALID_REQUEST`` naming it), never ignored. The values themselves are
checked by the views (``vma/api/validation.py`` and each view's helpers)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from pyapp.api import RequestModel
from vma.api.errors import ApiError


class TargetSpec(RequestModel):
    uri: str = Field(max_length=2048, description="nbd://host:port/export")
    base_change_id: str | None = Field(description="the change ID the target holds; null: none")


class ReplicateRequest(RequestModel):
    job_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    vcenter: str = Field(min_length=1, max_length=1024)
    username: str = Field(min_length=1, max_length=1024)
    password: str = Field(min_length=1, max_length=1024)
    tls_mode: Literal["verify", "thumbprint", "insecure"] | None = None
    tls_thumbprint: str | None = Field(None, max_length=200)
    vm_paths: list[str] = Field(min_length=1, max_length=256)
    oma_url: str | None = Field(
        None, max_length=1024, description="refused (422): the VMA reports to its configured oma_url"
    )
    mode: Literal["replicate", "export"] | None = None
    targets: dict[str, dict[str, str | TargetSpec]] | None = None
    vm_ids: dict[str, str] | None = None
    disks: dict[str, list[str]] | None = None
    previous_change_ids: dict[str, dict[str, str | None]] | None = None
    export_timeout: float | None = Field(None, gt=0, le=7 * 24 * 3600)


class CleanupRequest(RequestModel):
    job_id: str = Field(min_length=1, max_length=200)
    action: Literal["delete_snapshot", "cleanup_all"]


class VCenterRequest(RequestModel):
    """A body carrying a vCenter login (``vma/api/validation.py`` ``vcenter_login``)."""

    vcenter: str = Field(min_length=1, max_length=1024)
    username: str = Field(min_length=1, max_length=1024)
    password: str = Field(min_length=1, max_length=1024)
    tls_mode: Literal["verify", "thumbprint", "insecure"] | None = None
    tls_thumbprint: str | None = Field(None, max_length=200)


class DiscoverRequest(VCenterRequest):
    datacenter: str | None = Field(None, max_length=255)
    filter: str | None = Field(None, max_length=255)


class PowerOffRequest(VCenterRequest):
    force: bool = Field(True, description="power off hard when the guest did not shut down")
    shutdown_timeout: float = Field(
        120.0, ge=0, le=3600, description="seconds the guest may take to shut down; 0: no guest shutdown"
    )
    final_pass: bool = Field(
        False, description="the caller is a live failover whose final pass follows: active jobs do not block"
    )


class PowerOnRequest(VCenterRequest):
    pass


class ConfigRequest(RequestModel):
    nbd_port: int | None = Field(None, ge=1, le=65535)
    export_name: str | None = Field(None, min_length=1, max_length=4096)
    target_device: str | None = Field(None, min_length=1, max_length=4096)
    nbd_host: str | None = Field(None, min_length=1, max_length=4096)


def refuse_unknown_fields(body: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """``body`` when every field of it is one of ``model``'s; else 400 naming the others."""
    unknown = sorted(set(body) - set(model.model_fields))
    if unknown:
        raise ApiError.invalid(
            f"unknown field{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)[:500]}"
            f" (known: {', '.join(model.model_fields)})"
        )
    return body
