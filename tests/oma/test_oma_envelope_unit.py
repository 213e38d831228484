"""Unit checks of the shared error envelope (pyapp.api) on a bare quart-trio app, through
``app.test_app()`` — no server, no database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel, Field
from quart_schema import QuartSchema, validate_querystring, validate_request
from quart_trio import QuartTrio

from pyapp.api import ERROR_RESPONSES, ApiError, RequestModel, fast_json_views, install_error_handlers


class Body(RequestModel):
    name: str = Field(min_length=1, max_length=8)


class Query(BaseModel):
    limit: int = Field(10, ge=1, le=100)


def make_app() -> QuartTrio:
    app = QuartTrio("envelope")
    QuartSchema(app)
    install_error_handlers(app)

    @app.post("/things")
    @validate_request(Body)
    async def create(data: Body) -> tuple[dict[str, Any], int]:
        if data.name == "taken":
            raise ApiError.conflict("already there")
        return {"name": data.name}, 201

    @app.get("/things")
    @validate_querystring(Query)
    async def things(query_args: Query) -> dict[str, Any]:
        return {"limit": query_args.limit}

    @app.get("/boom")
    async def boom() -> dict[str, Any]:
        raise RuntimeError("unexpected")

    fast_json_views(app)
    return app


@pytest.fixture
async def client() -> AsyncIterator[Any]:
    app = make_app()
    async with app.test_app() as test_app:
        yield test_app.test_client()


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("post", "/things", {"json": {"name": 3}}, 422, "VALIDATION_FAILED"),
        ("post", "/things", {"json": {"name": "x" * 9}}, 422, "VALIDATION_FAILED"),
        ("post", "/things", {"json": {}}, 422, "VALIDATION_FAILED"),
        ("post", "/things", {"data": "name=x"}, 415, "UNSUPPORTED_MEDIA_TYPE"),
        ("post", "/things", {"json": {"name": "ok", "colour": "red"}}, 422, "VALIDATION_FAILED"),
        ("post", "/things", {"json": {"name": "a\x00b"}}, 400, "INVALID_REQUEST"),
        ("post", "/things", {"json": {"name": "ok", "n": 1 << 64}}, 400, "INVALID_REQUEST"),
        (
            "post",
            "/things",
            {"data": "{", "headers": {"Content-Type": "application/json"}},
            400,
            "INVALID_REQUEST",
        ),
        ("post", "/things", {"json": {"name": "taken"}}, 409, "CONFLICT"),
        ("get", "/things?limit=0", {}, 400, "INVALID_REQUEST"),
        ("get", "/nowhere", {}, 404, "NOT_FOUND"),
        ("delete", "/things", {}, 405, "METHOD_NOT_ALLOWED"),
        ("get", "/boom", {}, 500, "INTERNAL_ERROR"),
    ],
)
async def test_every_error_has_the_envelope(
    client: Any, method: str, path: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    response = await getattr(client, method)(path, **kwargs)
    assert response.status_code == status
    body = await response.get_json()
    assert body["code"] == code and body["error"] and body["timestamp"].endswith("Z")


async def test_success_bodies_are_plain_json(client: Any) -> None:
    response = await client.post("/things", json={"name": "ok"})
    assert response.status_code == 201 and await response.get_json() == {"name": "ok"}
    assert response.content_type == "application/json"


async def test_unknown_fields_are_named(client: Any) -> None:
    response = await client.post("/things", json={"name": "ok", "colour": "red", "size": 3})
    body = await response.get_json()
    assert response.status_code == 422
    assert "unknown fields colour, size" in body["error"]
    assert [d["loc"] for d in body["details"]] == [["colour"], ["size"]]


async def test_openapi_declares_the_envelope_for_every_operation(client: Any) -> None:
    response = await client.get("/openapi.json")
    doc = await response.get_json()
    assert doc["components"]["schemas"]["ErrorEnvelope"]["required"] == ["error", "code", "timestamp"]
    operations = [op for path in doc["paths"].values() for op in path.values()]
    assert len(operations) >= 3
    for op in operations:
        for status in ERROR_RESPONSES:
            schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorEnvelope"}
        assert any(code.startswith("2") for code in op["responses"])
