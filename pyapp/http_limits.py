"""What both services refuse before a view sees a request, and how they refuse it without
losing the connection.

- :func:`strict_json_loads` parses request bodies: nested at most :data:`MAX_JSON_DEPTH` deep,
  integers within 64 bits, numbers finite, no NUL character in any string or key (PostgreSQL
  cannot store one). Anything else is a 400 :class:`BodyRejected` naming where in the body.
- :func:`check_request_target`: a path parameter with a NUL character is a 400; an integer path
  parameter outside the database's ``serial`` range is a 404 (no such row). (Query strings are
  the query models' business: the OMA's ``QueryModel`` refuses NUL characters.)
- :class:`KeepAliveAfterRefusal`: an ASGI wrapper that lets a refused request's connection live
  on. A view that answers before reading the request body (401, 404, 405, 413) leaves the rest of
  the body unread, and hypercorn then closes the connection; the wrapper holds the end of the
  answer until the body has arrived (discarded as it comes, at most :data:`MAX_DRAIN_BYTES` and
  :data:`DRAIN_TIMEOUT_S`) so that the next request on the connection is answered.

:func:`install` puts all three on an app.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGIReceiveEvent, ASGISendCallable, ASGISendEvent, Scope
from quart import Quart, request
from quart.json.provider import JSONProvider
from werkzeug.exceptions import BadRequest, NotFound

MAX_JSON_DEPTH = 64
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
#: Every integer id in the APIs is a PostgreSQL ``serial``.
SERIAL_MAX = (1 << 31) - 1
MAX_DRAIN_BYTES = 64 * 1024 * 1024
DRAIN_TIMEOUT_S = 30.0

AsgiApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]


class BodyRejected(BadRequest):
    """A request body or target refused before validation (400); ``description`` says why."""


def _where(path: list[str | int]) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BodyRejected(f"the number {text[:32]} is out of range")
    return value


def _no_constants(name: str) -> Any:
    raise BodyRejected(f"{name} is not a JSON number")


def check_json_value(value: Any) -> None:
    """Refuse a parsed JSON document nested too deep, with a NUL character in a string or key, or
    an integer beyond 64 bits. Iterative: a document of any depth is checked without recursion."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise BodyRejected(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, str):
            if "\x00" in item:
                raise BodyRejected(f"{_where(path)} contains a NUL character")
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                raise BodyRejected(f"{_where(path)} is an integer beyond 64 bits")
        elif isinstance(item, dict):
            for key, child in item.items():
                if "\x00" in key:
                    raise BodyRejected(f"a key of {_where(path)} contains a NUL character")
                stack.append((child, [*path, key]))
        elif isinstance(item, list):
            stack.extend((child, [*path, i]) for i, child in enumerate(item))


def strict_json_loads(text: str | bytes) -> Any:
    """``json.loads`` for request bodies, with the limits of :func:`check_json_value`."""
    try:
        value = json.loads(text, parse_float=_finite_float, parse_constant=_no_constants)
    except RecursionError:
        raise BodyRejected(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    check_json_value(value)
    return value


class StrictJSONProvider(JSONProvider):
    """The app's JSON provider with :func:`strict_json_loads` for parsing; encoding is left to
    the provider it wraps."""

    def __init__(self, app: Quart, inner: JSONProvider) -> None:
        super().__init__(app)
        self._inner = inner

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return self._inner.dumps(obj, **kwargs)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return strict_json_loads(s)

    def response(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.response(*args, **kwargs)


async def check_request_target() -> None:
    """Before every request: no NUL in the path parameters, integer path parameters within the
    ids the database can hold."""
    for name, value in (request.view_args or {}).items():
        if isinstance(value, str) and "\x00" in value:
            raise BodyRejected(f"the path parameter {name} contains a NUL character")
        if isinstance(value, int) and not 0 <= value <= SERIAL_MAX:
            raise NotFound()


def _content_length(scope: Scope) -> int | None:
    for name, value in cast(Mapping[str, Any], scope).get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class KeepAliveAfterRefusal:
    """ASGI wrapper: the answer to a request whose body the app did not read ends only once the
    body has arrived (discarded), so that hypercorn keeps the HTTP/1.1 connection for the next
    request. A body that would exceed :data:`MAX_DRAIN_BYTES` is not waited for: the answer says
    ``Connection: close``."""

    def __init__(self, app: AsgiApp, *, max_drain_bytes: int = MAX_DRAIN_BYTES) -> None:
        self.app = app
        self.max_drain_bytes = max_drain_bytes

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = trio.Event()
        received = 0
        declared = _content_length(scope)

        async def counting_receive() -> ASGIReceiveEvent:
            nonlocal received
            message = await receive()
            fields = cast(Mapping[str, Any], message)
            if message["type"] == "http.request":
                received += len(fields.get("body", b""))
                if not fields.get("more_body", False):
                    body_done.set()
            else:
                body_done.set()
            return message

        async def drain() -> None:
            async def pull() -> None:
                while received <= self.max_drain_bytes:
                    await counting_receive()
                nursery.cancel_scope.cancel()  # too much: the connection closes

            with trio.move_on_after(DRAIN_TIMEOUT_S):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pull)
                    await body_done.wait()
                    nursery.cancel_scope.cancel()

        too_much = False

        async def finishing_send(message: ASGISendEvent) -> None:
            nonlocal too_much
            fields = cast(Mapping[str, Any], message)
            if message["type"] == "http.response.start" and not body_done.is_set():
                too_much = declared is not None and declared - received > self.max_drain_bytes
                if too_much:
                    headers = [*fields.get("headers", ()), (b"connection", b"close")]
                    message = cast(ASGISendEvent, {**fields, "headers": headers})
            elif (
                message["type"] == "http.response.body"
                and not fields.get("more_body", False)
                and not body_done.is_set()
                and not too_much
            ):
                await drain()
            await send(message)

        await self.app(scope, counting_receive, finishing_send)


def install(app: Quart) -> None:
    """Strict JSON parsing, the request-target check and :class:`KeepAliveAfterRefusal` on
    ``app`` (call after any extension that sets ``app.json``, such as quart-schema)."""
    app.json = StrictJSONProvider(app, app.json)
    app.before_request(check_request_target)
    app.asgi_app = KeepAliveAfterRefusal(app.asgi_app)  # type: ignore[method-assign]
