"""CloudStack's error vocabulary, as the double raises and renders it.

``ApiErrorCode`` is CloudStack's enum (``api/.../ApiErrorCode.java``): the code is both the HTTP
status of a synchronous error and the ``errorcode`` of its body. ``cserrorcode`` is the number
``CSExceptionErrorCode`` gives the Java exception class behind the error.

The exception classes mirror the Java ones the server code throws, because CloudStack answers them
differently depending on where they are thrown:

============================== ======================== ==================================
Java exception                  synchronous answer       inside an async job (jobresult)
============================== ======================== ==================================
InvalidParameterValueException  431, cserrorcode 4350    431 (``ApiAsyncJobDispatcher``)
CloudRuntimeException           530, cserrorcode 4250    530
RuntimeException                530, cserrorcode 9999    530
InsufficientAddressCapacity...  533, cserrorcode 4320    530
ServerApiException(code)        code, cserrorcode 9999   code
============================== ======================== ==================================

(``ApiServer.handleRequest`` maps the synchronous ones; ``ApiAsyncJobDispatcher.runJob`` keeps a
``ServerApiException``'s code, turns an ``InvalidParameterValueException`` into 431 and anything
else into 530.)
"""

from __future__ import annotations

import enum


class ApiErrorCode(enum.IntEnum):
    UNAUTHORIZED = 401
    UNAUTHORIZED2FA = 411
    METHOD_NOT_ALLOWED = 405
    MALFORMED_PARAMETER_ERROR = 430
    PARAM_ERROR = 431
    UNSUPPORTED_ACTION_ERROR = 432
    API_LIMIT_EXCEED = 429
    INTERNAL_ERROR = 530
    ACCOUNT_ERROR = 531
    ACCOUNT_RESOURCE_LIMIT_ERROR = 532
    INSUFFICIENT_CAPACITY_ERROR = 533
    RESOURCE_UNAVAILABLE_ERROR = 534
    RESOURCE_ALLOCATION_ERROR = 535
    RESOURCE_IN_USE_ERROR = 536
    NETWORK_RULE_CONFLICT_ERROR = 537


#: CSExceptionErrorCode's number for a ServerApiException thrown on its own.
SERVER_API_CS_ERROR_CODE = 9999


class CloudStackError(Exception):
    """An error CloudStack reports to the client. ``code`` is the synchronous answer's status and
    errorcode, ``job_code`` the errorcode when the same error ends an async job."""

    code: int = ApiErrorCode.INTERNAL_ERROR
    job_code: int = ApiErrorCode.INTERNAL_ERROR
    cs_error_code: int = SERVER_API_CS_ERROR_CODE

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class ServerApiError(CloudStackError):
    """``ServerApiException(code, description)``: the same code synchronously and in a job."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.job_code = code


class InvalidParameterValue(CloudStackError):
    """``InvalidParameterValueException``: the service layer refusing a request."""

    code = ApiErrorCode.PARAM_ERROR
    job_code = ApiErrorCode.PARAM_ERROR
    cs_error_code = 4350


class CloudRuntimeError(CloudStackError):
    """``CloudRuntimeException``: an operation that failed."""

    cs_error_code = 4250


class RuntimeFailure(CloudStackError):
    """A plain Java ``RuntimeException`` (device id allocation throws these)."""


class InsufficientAddressCapacity(CloudStackError):
    """``InsufficientAddressCapacityException``: a requested IP address is taken."""

    code = ApiErrorCode.INSUFFICIENT_CAPACITY_ERROR
    cs_error_code = 4320


def param_error(command_name: str, detail: str) -> ServerApiError:
    """What ``ParamProcessWorker`` raises for a parameter it cannot use; ``command_name`` is the
    command's lower-case name (its response name without ``response``)."""
    return ServerApiError(ApiErrorCode.PARAM_ERROR, f"Unable to execute API command {command_name} {detail}")
