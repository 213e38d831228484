"""Helpers shared by the blueprints: pagination, row conversion, request context."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, Field
from quart import request

from pyapp.db import Record

MAX_NAME = 255
MAX_TEXT = 4096


class Page(BaseModel):
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
