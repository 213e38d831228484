"""Pages of a list: ``limit``/``offset`` and the body every list answers with."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from oma.store.rows import json_columns
from pyapp.db import Database


class Page(BaseModel):
    """``limit``/``offset`` pagination of every list (default 100, at most 1000 per page)."""

    limit: int = Field(100, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=10_000_000)


def page_body(key: str, items: list[dict[str, Any]], total: int, page: Page) -> dict[str, Any]:
    return {key: items, "total": total, "limit": page.limit, "offset": page.offset, "count": len(items)}


async def json_page(
    db: Database,
    key: str,
    *,
    columns: str,
    from_where: str,
    order: list[tuple[str, str]],
    args: tuple[Any, ...],
    page: Page,
) -> str:
    """One page of a list as a JSON document, rendered by PostgreSQL in a single round trip.

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
    return (
        f'{{"{key}":{row["items"]},"total":{row["total"]},"limit":{page.limit},'
        f'"offset":{page.offset},"count":{row["count"]}}}'
    )
