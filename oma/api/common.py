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


def row_dict(row: Record | Mapping[str, Any], *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """A record as JSON-ready dict: timestamps in ISO 8601 UTC, JSON columns decoded."""
    skip = set(exclude)
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in skip:
            continue
        if isinstance(value, dt.datetime):
            out[key] = iso(value)
        elif key in {"disks", "networks", "details"} and isinstance(value, str):
            out[key] = json.loads(value)
        else:
            out[key] = value
    return out


def page_body(key: str, items: list[dict[str, Any]], total: int, page: Page) -> dict[str, Any]:
    return {key: items, "total": total, "limit": page.limit, "offset": page.offset, "count": len(items)}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def client_ip() -> str | None:
    return request.remote_addr
