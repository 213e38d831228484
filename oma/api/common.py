"""Helpers shared by the blueprints: pagination, row conversion, request context, and the bases of
request models (:class:`RequestModel`: unknown fields refused; :class:`QueryModel`: no NUL
characters; :data:`SerialId`: an id the database can hold)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Annotated, Any

import trio
from pydantic import BaseModel, Field, model_validator
from quart import Response, request

from pyapp.api import RequestModel as RequestModel
from pyapp.db import Database, Record
from pyapp.http_limits import SERIAL_MAX

MAX_NAME = 255
MAX_TEXT = 4096
#: An integer id of a row (a PostgreSQL ``serial``).
SerialId = Annotated[int, Field(ge=1, le=SERIAL_MAX)]


class QueryModel(BaseModel):
    """The base of query-string models: a NUL character in any parameter is refused (400), as
    PostgreSQL cannot hold one."""

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and any("\x00" in f"{k}{v}" for k, v in data.items()):
            raise ValueError("a query parameter contains a NUL character")
        return data


class Page(QueryModel):
    """``limit``/``offset`` pagination of every list (default 100, at most 1000 per page)."""

    limit: int = Field(100, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=10_000_000)


def iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_JSON_COLUMNS = ("disks", "networks", "details")


def row_dict(row: Record | Mapping[str, Any], *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """A record as a dict ready for the JSON response: JSON columns decoded; timestamps stay
    datetimes (the response encoder writes them as ISO 8601 UTC)."""
    out = dict(row.items())
    for key in exclude:
        out.pop(key, None)
    for key in _JSON_COLUMNS:
        value = out.get(key)
        if isinstance(value, str):
            out[key] = json.loads(value)
    return out


def page_body(key: str, items: list[dict[str, Any]], total: int, page: Page) -> dict[str, Any]:
    return {key: items, "total": total, "limit": page.limit, "offset": page.offset, "count": len(items)}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def client_ip() -> str | None:
    return request.remote_addr


def json_columns(columns: str, alias: str = "t") -> str:
    """A select list over ``alias`` with every timestamp column rendered by ``api_ts``."""
    out = []
    for column in (c.strip() for c in columns.split(",")):
        out.append(f"api_ts({alias}.{column}) AS {column}" if column.endswith("_at") else f"{alias}.{column}")
    return ", ".join(out)


async def json_page(
    db: Database,
    key: str,
    *,
    columns: str,
    from_where: str,
    order: list[tuple[str, str]],
    args: tuple[Any, ...],
    page: Page,
) -> Response:
    """One page of a list, rendered as JSON by PostgreSQL in a single round trip.

    ``from_where`` is ``FROM <table> t WHERE ...`` over the parameters ``args`` (limit and offset
    follow them); ``order`` the page order as (column of ``t``, ASC|DESC) pairs. The answer is the
    body :func:`page_body` would give, without decoding and re-encoding every row in Python.
    """
    n = len(args)
    keys = ", ".join(f"t.{col} AS _k{i}" for i, (col, _) in enumerate(order))
    inner_order = ", ".join(f"t.{col} {direction}" for col, direction in order)
    outer_order = ", ".join(f"p._k{i} {direction}" for i, (_, direction) in enumerate(order))
    strip = " ".join(f"- '_k{i}'" for i in range(len(order)))
    row = await db.fetchrow(
        f"WITH p AS (SELECT {json_columns(columns)}, {keys} {from_where}"
        f" ORDER BY {inner_order} LIMIT ${n + 1} OFFSET ${n + 2})"
        f" SELECT coalesce((SELECT json_agg(to_jsonb(p) {strip} ORDER BY {outer_order}) FROM p),"
        f" '[]'::json)::text AS items, (SELECT count(*) FROM p) AS count,"
        f" (SELECT count(*) {from_where}) AS total",
        *args,
        page.limit,
        page.offset,
    )
    assert row is not None
    body = (
        f'{{"{key}":{row["items"]},"total":{row["total"]},"limit":{page.limit},'
        f'"offset":{page.offset},"count":{row["count"]}}}'
    )
    return Response(body, content_type="application/json")


@contextlib.contextmanager
def not_cut_short() -> Iterator[None]:
    """Shield a short transaction from the request's cancellation (hypercorn cancels a handler
    whose client hung up, e.g. the VMA's progress report cut off by the end of its job). A query
    cancelled half-way leaves its pooled connection inside the transaction, holding the job row's
    lock, and every later update of that job waits for it."""
    with trio.CancelScope(shield=True):
        yield
