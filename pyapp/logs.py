"""JSON line logging shared by the OMA and the VMA.

Every record is one JSON object on one line with at least ``timestamp`` (UTC, ISO 8601),
``level``, ``message``, ``job_id`` and ``action`` (``null`` when not set). ``job_id`` and
``action`` come from the ``extra`` of the call or, when absent, from the context set with
:func:`log_context` — so a request handler sets them once and every record below it carries them.

A bounded in-memory ring of recent records (:class:`RecentRecords`) backs the OMA's
``/debug/logs``. Secrets never belong in a log message; callers pass identifiers, not passwords.
As a second line of defence every record is redacted on its way out (:func:`redact`, applied by
:func:`record_to_dict`, so to the JSON lines and the ring alike): a field whose name ends in a
secret's word (``password``, ``secret``, ``token``, ``authorization``, ...) keeps its name with
``[redacted]`` for a value, at any depth; in the message, the exception and every string value,
``key=value`` and ``"key": "value"`` pairs of such keys, ``Bearer`` tokens and the
password of a URL's ``user:password@`` are replaced the same way.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import datetime as dt
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from typing import IO, Any

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("log_job_id", default=None)
_action: contextvars.ContextVar[str | None] = contextvars.ContextVar("log_action", default=None)

# Attributes every LogRecord has; anything else given through ``extra`` is emitted as a field.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


REDACTED = "[redacted]"
#: A field is secret when the last word of its name (``new_password``, ``oma_secret``,
#: ``access_token``) is one of these; ``token_id`` or ``password_changed`` are not.
_SECRET_WORDS = frozenset(
    {
        "password", "passwd", "pwd", "passphrase", "secret", "token", "authorization", "cookie",
        "credentials", "apikey", "signature", "privatekey",
    }
)  # fmt: skip
_SECRET_KEY_TEXT = r"[\w.-]*?(?:password|passwd|pwd|passphrase|secret|token|api[_-]?key|authorization)"
# "password": "x", 'password': 'x' (JSON, Python reprs)
_QUOTED_PAIR = re.compile(rf"""(?i)(["'])({_SECRET_KEY_TEXT})\1(\s*[:=]\s*)(["'])(?:\\.|(?!\4).)*\4""")
# password=x, password='x' (mount options, query strings, dataclass reprs)
_PLAIN_PAIR = re.compile(
    rf"""(?i)(?<![\w.-])({_SECRET_KEY_TEXT})(\s*=\s*)(?:(["'])(?:\\.|(?!\3).)*\3|[^\s,;&'"\]}})]+)"""
)
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer)(\s+)[A-Za-z0-9._~+/=-]{6,}")
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]+):[^\s/@]+@")


def _secret_key(key: str) -> bool:
    words = [w for w in re.split(r"[^a-z0-9]+", key.lower()) if w]
    if not words:
        return False
    return words[-1] in _SECRET_WORDS or "".join(words[-2:]) in _SECRET_WORDS


def redact_text(text: str) -> str:
    """``text`` with the secrets of known shapes replaced by ``[redacted]`` (see the module doc)."""
    text = _QUOTED_PAIR.sub(rf"\1\2\1\3\4{REDACTED}\4", text)
    text = _PLAIN_PAIR.sub(lambda m: f"{m[1]}{m[2]}{m[3] or ''}{REDACTED}{m[3] or ''}", text)
    text = _AUTH_SCHEME.sub(rf"\1\2{REDACTED}", text)
    return _URL_USERINFO.sub(rf"\1:{REDACTED}@", text)


def redact(value: Any, key: str | None = None) -> Any:
    """A log field's value with its secrets redacted: the whole value under a secret's name (but
    ``None`` and booleans, which hold none), strings scrubbed, containers walked."""
    if key is not None and _secret_key(key) and value is not None and not isinstance(value, bool):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(v) for v in value]
    if isinstance(value, bool | int | float) or value is None:
        return value
    return redact_text(str(value))  # what json.dumps(default=str) would have written


def utc_timestamp(when: float | None = None) -> str:
    """ISO 8601 UTC with millisecond precision and a ``Z`` suffix."""
    moment = dt.datetime.now(dt.UTC) if when is None else dt.datetime.fromtimestamp(when, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@contextlib.contextmanager
def log_context(*, job_id: str | None = None, action: str | None = None) -> Iterator[None]:
    """Set ``job_id``/``action`` for every record logged in this context (task-local)."""
    tokens: list[tuple[contextvars.ContextVar[str | None], contextvars.Token[str | None]]] = []
    if job_id is not None:
        tokens.append((_job_id, _job_id.set(job_id)))
    if action is not None:
        tokens.append((_action, _action.set(action)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def record_to_dict(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "timestamp": utc_timestamp(record.created),
        "level": record.levelname.lower(),
        "message": redact_text(record.getMessage()),
        "job_id": getattr(record, "job_id", None) or _job_id.get(),
        "action": getattr(record, "action", None) or _action.get(),
        "logger": record.name,
    }
    for key, value in vars(record).items():
        if key not in _STANDARD_ATTRS and key not in out:
            out[key] = redact(value, key)
    if record.exc_info and record.exc_info[0] is not None:
        out["exception"] = redact_text(logging.Formatter().formatException(record.exc_info))
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(record_to_dict(record), default=str, separators=(",", ":"))


class RecentRecords(logging.Handler):
    """Keeps the last ``capacity`` records as dicts (thread-safe), newest last."""

    def __init__(self, capacity: int = 1000) -> None:
        super().__init__()
        self._records: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            item = record_to_dict(record)
        except Exception:  # a broken record must never take the service down
            self.handleError(record)
            return
        with self._guard:
            self._records.append(item)

    def snapshot(self, *, limit: int, min_level: int = logging.NOTSET) -> list[dict[str, Any]]:
        with self._guard:
            items = list(self._records)
        wanted = [r for r in items if logging.getLevelName(str(r["level"]).upper()) >= min_level]
        return wanted[-limit:] if limit > 0 else []


def setup_logging(
    level: int | str = logging.INFO, *, stream: IO[str] | None = None, recent_capacity: int = 1000
) -> RecentRecords:
    """Route the root logger to JSON lines on ``stream`` (stderr by default).

    Idempotent: handlers installed by an earlier call are replaced. Returns the ring of recent
    records so a service can expose it.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_pyapp_json", False):
            root.removeHandler(handler)
    out = logging.StreamHandler(stream or sys.stderr)
    out.setFormatter(JsonFormatter())
    recent = RecentRecords(recent_capacity)
    handlers: tuple[logging.Handler, ...] = (out, recent)
    for handler in handlers:
        setattr(handler, "_pyapp_json", True)  # noqa: B010 -- marks the handlers this module owns
        root.addHandler(handler)
    root.setLevel(level)
    # Python's warnings (a library's DeprecationWarning, platformdirs' RuntimeDirWarning) would be
    # printed as bare text on stderr: they go through logging too, so every line is JSON.
    logging.captureWarnings(True)
    # HTTP clients log every request at INFO; the services log what matters themselves.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # hypercorn and quart log through their own loggers; keep them, formatted the same way.
    for name in ("hypercorn.error", "quart.app", "quart.serving"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    return recent
