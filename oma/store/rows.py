"""Rows as the API shows them: decoded JSON columns, ISO 8601 timestamps, new text ids."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from pyapp.db import Record


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


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def json_columns(columns: str, alias: str = "t") -> str:
    """A select list over ``alias`` with every timestamp column rendered by ``api_ts``."""
    out = []
    for column in (c.strip() for c in columns.split(",")):
        out.append(f"api_ts({alias}.{column}) AS {column}" if column.endswith("_at") else f"{alias}.{column}")
    return ", ".join(out)
