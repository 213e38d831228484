"""API errors of the VMA: the seed's envelope ``{"error", "code", "timestamp"}`` and its codes.

An :class:`ApiError` raised anywhere in a view becomes that envelope with its HTTP status; any
other exception becomes a 500 ``OPERATION_FAILED`` whose message names the exception's type only
(details go to the log, never to the client).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from quart import Quart, Response, jsonify
from werkzeug.exceptions import HTTPException

INVALID_REQUEST = "INVALID_REQUEST"
JOB_NOT_FOUND = "JOB_NOT_FOUND"
OPERATION_FAILED = "OPERATION_FAILED"

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
    def job_not_found(cls, job_id: str) -> ApiError:
        return cls(404, JOB_NOT_FOUND, f"job {job_id} not found")

    @classmethod
    def failed(cls, message: str) -> ApiError:
        return cls(500, OPERATION_FAILED, message)


def error_response(status: int, code: str, message: str) -> Response:
    response = jsonify({"error": message, "code": code, "timestamp": utc_now_iso()})
    response.status_code = status
    return response


def install_error_handlers(app: Quart) -> None:
    @app.errorhandler(ApiError)
    async def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message)

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
