"""The REST error envelope shared by the OMA and the VMA, and the quart handlers that produce it.

Every error a client sees is ``{"error": <human message>, "code": <stable code>, "timestamp":
<UTC ISO 8601>}``, optionally with ``details`` (validation errors). Handlers raise :class:`ApiError`
(or one of its named constructors); :func:`install_error_handlers` maps everything else — schema
validation failures, bodies that are not JSON, unknown paths, wrong methods, oversized bodies and
unexpected exceptions — to the same envelope.

Status mapping: a body sent with another content type than ``application/json`` is 415
``UNSUPPORTED_MEDIA_TYPE``; a body that is not JSON, or JSON the services refuse to parse (nested
too deep, integers beyond 64 bits, NUL characters: :mod:`pyapp.http_limits`) is 400
``INVALID_REQUEST``; a JSON body that does not fit the model is 422 ``VALIDATION_FAILED`` naming
the fields (request models derive from :class:`RequestModel`, so an unknown field is refused,
never dropped); a query string that does not fit is 400 ``INVALID_REQUEST``; a body over
``MAX_CONTENT_LENGTH`` is 413 ``PAYLOAD_TOO_LARGE``.

:func:`install_error_handlers` also makes the app's OpenAPI document (quart-schema) declare these
answers, with the envelope's schema, for every operation.
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict
from quart import Quart, Response, request
from quart_schema import RequestSchemaValidationError
from quart_schema.openapi import OpenAPIProvider
from quart_schema.validation import QuerystringValidationError
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Rule

from pyapp import http_limits
from pyapp.logs import utc_timestamp

log = logging.getLogger(__name__)

INVALID_REQUEST = "INVALID_REQUEST"
VALIDATION_FAILED = "VALIDATION_FAILED"
UNAUTHORIZED = "UNAUTHORIZED"
FORBIDDEN = "FORBIDDEN"
NOT_FOUND = "NOT_FOUND"
METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
CONFLICT = "CONFLICT"
JOB_NOT_FOUND = "JOB_NOT_FOUND"
PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
OPERATION_FAILED = "OPERATION_FAILED"
UPSTREAM_UNAVAILABLE = "UPSTREAM_UNAVAILABLE"
INTERNAL_ERROR = "INTERNAL_ERROR"


class RequestModel(BaseModel):
    """The base of every request body model: a field the model does not know is refused (422
    naming it), never silently dropped."""

    model_config = ConfigDict(extra="forbid")


class ApiError(Exception):
    """An error meant for the API client: status, stable code and a message safe to show."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    @classmethod
    def bad_request(cls, message: str, details: Any = None) -> ApiError:
        return cls(400, INVALID_REQUEST, message, details)

    @classmethod
    def unauthorized(cls, message: str = "authentication required") -> ApiError:
        return cls(401, UNAUTHORIZED, message)

    @classmethod
    def forbidden(cls, message: str = "not allowed for this principal") -> ApiError:
        return cls(403, FORBIDDEN, message)

    @classmethod
    def not_found(cls, message: str, code: str = NOT_FOUND) -> ApiError:
        return cls(404, code, message)

    @classmethod
    def conflict(cls, message: str) -> ApiError:
        return cls(409, CONFLICT, message)

    @classmethod
    def unprocessable(cls, message: str, details: Any = None) -> ApiError:
        return cls(422, VALIDATION_FAILED, message, details)

    @classmethod
    def upstream(cls, message: str) -> ApiError:
        return cls(502, UPSTREAM_UNAVAILABLE, message)


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_json_default)


def json_response(body: Any, status: int = 200) -> Response:
    """A JSON response encoded once, with the C encoder (datetimes as ISO 8601 UTC)."""
    return Response(_encoder.encode(body), status=status, content_type="application/json")


def fast_json_views(app: Quart) -> None:
    """Turn the dict/list (and ``(body, status)``) results of every view into :class:`Response`
    objects directly.

    quart-schema converts every dict a view returns through a fresh pydantic ``TypeAdapter``
    before quart encodes it — several milliseconds for a page of 100 rows. Views here return
    plain JSON data, so they are encoded once. Call after every blueprint is registered.
    """
    for endpoint, view in list(app.view_functions.items()):
        app.view_functions[endpoint] = _fast_json(view)


def _fast_json(view: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(view)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = view(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, dict | list):
            return json_response(result)
        if (
            isinstance(result, tuple)
            and len(result) == 2
            and isinstance(result[0], dict | list)
            and isinstance(result[1], int)
        ):
            return json_response(result[0], result[1])
        return result

    return wrapper


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": message, "code": code, "timestamp": utc_timestamp()}
    if details is not None:
        body["details"] = details
    return body


def error_response(status: int, code: str, message: str, details: Any = None) -> Response:
    response = json_response(error_body(code, message, details), status)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _validation_details(error: Exception) -> Any:
    inner = getattr(error, "validation_error", None)
    errors = getattr(inner, "errors", None)
    if callable(errors):
        # pydantic: keep location, message and type; never echo the offending input back.
        return [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg"), "type": e.get("type")}
            for e in errors(include_url=False, include_input=False)
        ]
    return str(inner) if inner is not None else None


def _validation_message(details: Any) -> str:
    """The 422's message: the fields at fault, unknown ones first."""
    message = "the request body does not match the schema"
    if not isinstance(details, list) or not details:
        return message
    unknown = [".".join(d["loc"]) for d in details if d.get("type") == "extra_forbidden"]
    if unknown:
        return f"{message}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown[:10])}"
    first = details[0]
    where = ".".join(first["loc"]) or "the body"
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return f"{message}: {where}: {first['msg']}{more}"


_HTTP_CODES = {
    400: INVALID_REQUEST,
    401: UNAUTHORIZED,
    403: FORBIDDEN,
    404: NOT_FOUND,
    405: METHOD_NOT_ALLOWED,
    409: CONFLICT,
    413: PAYLOAD_TOO_LARGE,
    415: UNSUPPORTED_MEDIA_TYPE,
    422: VALIDATION_FAILED,
}

#: The error answers every operation of the OpenAPI document declares (besides its own).
ERROR_RESPONSES = {
    400: "malformed request: not JSON, refused JSON (too deep, NUL, integers beyond 64 bits), bad query",
    401: "no valid bearer token",
    403: "not allowed for this principal",
    404: "no such resource",
    409: "conflicts with the current state",
    410: "gone",
    413: "request body over the size limit",
    415: "request body not application/json",
    422: "request body does not match the schema (unknown fields included)",
    429: "too many requests",
    500: "internal error",
    502: "an upstream service (VMA, vCenter, CloudStack) failed or could not be reached",
    503: "unavailable (a repository, the database, CloudStack's request limit)",
    504: "an upstream service (CloudStack, a job of it) did not answer in time",
}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error", "code", "timestamp"],
    "properties": {
        "error": {"type": "string"},
        "code": {"type": "string"},
        "timestamp": {"type": "string", "format": "date-time"},
        "details": {},
    },
}


class EnvelopeOpenAPIProvider(OpenAPIProvider):
    """quart-schema's OpenAPI generation, with the error envelope declared for every operation
    (:data:`ERROR_RESPONSES`) and a JSON success answer for those that declare none."""

    def schema(self) -> dict[str, Any]:
        schema = super().schema()
        schema["components"]["schemas"]["ErrorEnvelope"] = ERROR_SCHEMA
        return schema

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        for operations in paths.values():
            for operation in operations.values():
                # quart-schema keys documented answers by int: one kind of key, or no JSON dump sorts them
                responses = {str(code): answer for code, answer in operation.get("responses", {}).items()}
                if not any(str(code).startswith("2") for code in responses):
                    responses["2XX"] = {
                        "description": "success",
                        "content": {"application/json": {"schema": {}}},
                    }
                for status, description in ERROR_RESPONSES.items():
                    responses.setdefault(
                        str(status),
                        {
                            "description": description,
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}
                            },
                        },
                    )
                operation["responses"] = responses
        return paths, components


def install_error_handlers(app: Quart) -> None:
    """Make every error of ``app`` answer with the envelope; refuse bad input before the views
    (:func:`pyapp.http_limits.install`); declare the envelope in the OpenAPI document."""
    http_limits.install(app)
    schema_ext = app.extensions.get("QUART_SCHEMA")
    if schema_ext is not None:
        schema_ext.openapi_provider = EnvelopeOpenAPIProvider(app, schema_ext)

    @app.errorhandler(ApiError)
    async def _api_error(error: ApiError) -> Response:
        return error_response(error.status, error.code, error.message, error.details)

    @app.errorhandler(RequestSchemaValidationError)
    async def _schema_error(error: RequestSchemaValidationError) -> Response:
        if isinstance(error, QuerystringValidationError):
            return error_response(
                400, INVALID_REQUEST, "invalid query parameters", _validation_details(error)
            )
        if not request.is_json:
            return error_response(
                415, UNSUPPORTED_MEDIA_TYPE, "the request body must be JSON (Content-Type: application/json)"
            )
        try:
            parsed = await request.get_json(silent=True)
        except UnicodeDecodeError:
            parsed = None
        if parsed is None:
            return error_response(400, INVALID_REQUEST, "the request body is not valid JSON")
        details = _validation_details(error)
        return error_response(422, VALIDATION_FAILED, _validation_message(details), details)

    @app.errorhandler(UnicodeDecodeError)
    async def _not_utf8(error: UnicodeDecodeError) -> Response:
        return error_response(400, INVALID_REQUEST, "the request body is not valid UTF-8")

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = _HTTP_CODES.get(status, INTERNAL_ERROR if status >= 500 else INVALID_REQUEST)
        if isinstance(error, http_limits.BodyRejected):
            message = error.description or "malformed request"
        elif status == 400:
            message = "malformed request (the body is not valid JSON?)"
        elif status == 404:
            message = f"no such resource: {request.path}"[:300]
        elif status == 405:
            message = f"method {request.method} not allowed on {request.path}"[:300]
        else:
            message = error.description or error.name
        return error_response(status, code, message)

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        log.exception("unhandled error", extra={"action": "http_error", "path": request.path})
        return error_response(500, INTERNAL_ERROR, "internal error; see the service log")
