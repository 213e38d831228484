"""Backup repositories: create, list, test, capacity, delete (the seed's "Backup Repository
Management"); the HTTP side of :mod:`oma.backups.registry`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from quart import Blueprint
from quart_schema import validate_querystring, validate_request

from oma.api.access import requires
from oma.api.requests import MAX_NAME, RequestModel
from oma.backups import registry
from oma.backups.repositories import RepositoryType
from oma.state import state

bp = Blueprint("repositories", __name__)


class CreateRepositoryRequest(RequestModel):
    name: str = Field(min_length=1, max_length=MAX_NAME)
    type: RepositoryType
    config: dict[str, Any] = Field(
        description="local: disk_path; nfs: server, export_path; cifs: server,"
        " share_name, username, password (see docs/backup.md)"
    )
    enabled: bool = True
    immutable: bool = False
    immutable_days: int = Field(0, ge=0, le=36500)


class TestRepositoryRequest(RequestModel):
    type: RepositoryType
    config: dict[str, Any]


class RepositoryListQuery(BaseModel):
    type: RepositoryType | None = None
    enabled: bool | None = None


@bp.post("/repositories")
@requires("operator")
@validate_request(CreateRepositoryRequest)
async def create_repository(data: CreateRepositoryRequest) -> tuple[dict[str, Any], int]:
    st = state()
    body = await registry.create_repository(
        st.db,
        st.box,
        st.config.mounts_dir,
        name=data.name,
        repo_type=data.type,
        config=data.config,
        enabled=data.enabled,
        immutable=data.immutable,
        immutable_days=data.immutable_days,
    )
    return body, 201


@bp.get("/repositories")
@requires("viewer")
@validate_querystring(RepositoryListQuery)
async def list_repositories(query_args: RepositoryListQuery) -> dict[str, Any]:
    st = state()
    return await registry.list_repositories(st.db, st.config.mounts_dir, query_args.type, query_args.enabled)


@bp.get("/repositories/<repository_id>")
@requires("viewer")
async def get_repository(repository_id: str) -> dict[str, Any]:
    st = state()
    return await registry.get_repository(st.db, st.config.mounts_dir, repository_id)


@bp.get("/repositories/<repository_id>/storage")
@requires("viewer")
async def get_repository_storage(repository_id: str) -> dict[str, Any]:
    """A fresh capacity reading; the repository is prepared (mounted) first, like a backup would."""
    st = state()
    return await registry.fresh_storage(st.db, st.box, st.config.mounts_dir, repository_id)


@bp.post("/repositories/test")
@requires("operator")
@validate_request(TestRepositoryRequest)
async def test_repository(data: TestRepositoryRequest) -> dict[str, Any]:
    """Try a configuration without saving it: ``success: false`` (200) when it cannot be reached,
    422 when the configuration itself is invalid."""
    return await registry.try_repository(state().config.mounts_dir, data.type, data.config)


@bp.delete("/repositories/<repository_id>")
@requires("operator")
async def delete_repository(repository_id: str) -> dict[str, Any]:
    st = state()
    return await registry.delete_repository(st.db, st.config.mounts_dir, repository_id)
