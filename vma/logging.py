"""JSON-lines logging with the seed's fields: ``timestamp, level, message, job_id, action``.

``job_id`` and ``action`` come from the record's ``extra`` or, when absent, from the context set by
:func:`log_context` (a :class:`contextvars.ContextVar`, so every trio task keeps its own). Other
``extra`` fields are added as they are; exceptions go in ``exc``.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("vma_job_id", default=None)
_action: contextvars.ContextVar[str | None] = contextvars.ContextVar("vma_action", default=None)

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


@contextmanager
def log_context(*, job_id: str | None = None, action: str | None = None) -> Iterator[None]:
    tokens = []
    if job_id is not None:
        tokens.append((_job_id, _job_id.set(job_id)))
    if action is not None:
        tokens.append((_action, _action.set(action)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None) or _job_id.get(),
            "action": getattr(record, "action", None) or _action.get(),
            "logger": record.name,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "hypercorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
