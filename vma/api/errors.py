"""API errors of the VMA: the seed's envelope ``{"error", "code", "timestamp"}`` and its codes.

An :class:`ApiError` raised anywhere in a view becomes that envelope with its HTTP status; so do
the job tracker's errors (an unknown job id is a 404 ``JOB_NOT_FOUND``, the id of a job that has
not finished a 400 ``INVALID_REQUEST``); a vCenter that refuses or fails is a 502
``OPERATION_FAILED``; any other exception becomes a 500 ``OPERATION_FAILED`` whose message names
the exception's type only (details go to the log, never to the client).

:func:`install_error_handlers` also sets what every request must respect before a view runs
(:mod:`pyapp.http_limits`: bodies of at most :data:`MAX_BODY_BYTES`, strict JSON, the connection
kept after an early refusal) and serves the OpenAPI document at ``/api/v1/swagger/openapi.json``
with the envelope declared for every operation.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from quart import Quart, Response, jsonify, request
from quart_schema import QuartSchema
from quart_schema.openapi import Info
from werkzeug.exceptions import HTTPException

from pyapp import http_limits
from pyapp.api import EnvelopeOpenAPIProvider
from vma.replication.jobs import JobConflict, JobNotFound

INVALID_REQUEST = "INVALID_REQUEST"
JOB_NOT_FOUND = "JOB_NOT_FOUND"
OPERATION_FAILED = "OPERATION_FAILED"

MAX_BODY_BYTES = 1024 * 1024
OPENAPI_PATH = "/api/v1/swagger/openapi.json"

log = logging.getLogger(__name__)


def utc_now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class ApiError(Exception):
    """An error meant for the API client: HTTP status, one of the seed's codes, a safe message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    @classmethod
    def invalid(cls, message: str) -> ApiError:
        return cls(400, INVALID_REQUEST, message)

    @classmethod
    def failed(cls, message: str, status: int = 502) -> ApiError:
        """The operation failed elsewhere: vCenter refused or failed (502), or a job would not
        stop (503)."""
        return cls(status, OPERATION_FAILED, message)


def error_response(status: int, code: str, message: str) -> Response:
    response = jsonify({"error": message, "code": code, "timestamp": utc_now_iso()})
    response.status_code = status
    return response


def install_error_handlers(app: Quart) -> None:
    """The envelope for every error, the request limits and the OpenAPI document (see above)."""
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    schema = QuartSchema(
        app,
        openapi_path=OPENAPI_PATH,
        swagger_ui_path="/api/v1/swagger/",
        redoc_ui_path=None,
        scalar_ui_path=None,
        info=Info(title="VMA API", version="1"),
    )
    schema.openapi_provider = EnvelopeOpenAPIProvider(app, schema)
    http_limits.install(app)

    @app.errorhandler(ApiError)
    async def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message)

    @app.errorhandler(JobNotFound)
    async def _job_not_found(exc: JobNotFound) -> Response:
        return error_response(404, JOB_NOT_FOUND, str(exc))

    @app.errorhandler(JobConflict)
    async def _job_conflict(exc: JobConflict) -> Response:
        return error_response(400, INVALID_REQUEST, str(exc))

    @app.errorhandler(UnicodeDecodeError)
    async def _not_utf8(exc: UnicodeDecodeError) -> Response:
        return error_response(400, INVALID_REQUEST, "the request body is not valid UTF-8")

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        # An unknown path or method is a malformed request (JOB_NOT_FOUND is for job ids only).
        code = INVALID_REQUEST if status < 500 else OPERATION_FAILED
        return error_response(status, code, exc.description or exc.name)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error", extra={"action": "api_error"})
        return error_response(500, OPERATION_FAILED, f"internal error ({type(exc).__name__})")


def require_json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError.invalid("the request body must be a JSON object")
    return body


async def json_object() -> dict[str, Any]:
    """The request's body, a JSON object: else 415 (not ``application/json``) or 400."""
    if not request.is_json:
        raise ApiError(415, INVALID_REQUEST, "the request body must be JSON (Content-Type: application/json)")
    return require_json_object(await request.get_json(silent=True))
