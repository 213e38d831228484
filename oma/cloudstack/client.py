"""The OMA's CloudStack API client.

The kept library ``cs`` builds, signs (HMAC-SHA1, ``signatureVersion=3`` with ``expires``) and
sends every request; nothing here signs anything. This module wraps it for a trio service:

- **off the event loop**: each call runs in a worker thread under one capacity limiter. A
  read-only call (``list*``, ``query*``, ``get*``) is abandoned when its task is cancelled; a
  call that changes something is waited for (bounded by the request timeout), so its outcome is
  never lost;
- **bounded**: every request has a timeout (``OMA_CLOUDSTACK_TIMEOUT``, of which at most 5 s to
  connect, as for the VMA); an asynchronous job
  (``jobid``) is polled with ``queryAsyncJobResult`` until ``jobstatus`` 1 (done) or 2 (failed),
  for at most ``OMA_CLOUDSTACK_JOB_TIMEOUT``;
- **retried when safe** (tenacity, exponential backoff with jitter): a connection that could
  not be made, any command (the request never left); a read-only command also after a timeout,
  a dropped connection, any 5xx answer and 429 (API limit); a command that changes something
  only after 502/503/504 (a proxy's answer: CloudStack did not run it) and 429;
- **in the envelope**: every failure is a :class:`CloudStackError`, an
  :class:`~pyapp.api.ApiError` with the status and code of :func:`map_error`'s table and
  CloudStack's own ``errorcode``/``errortext`` in ``details``, so no CloudStack failure is ever
  a 500.

**``~`` in a value.** CloudStack's server checks a signature over the values encoded with
``java.net.URLEncoder`` (which encodes ``~``); ``cs`` encodes them with ``urllib.parse.quote``
(which leaves ``~`` alone), so a request carrying ``~`` in any signed value — the API key
included — is refused with 401 by a real CloudStack. The client refuses such a request before
sending it (422 ``CLOUDSTACK_UNSIGNABLE_VALUE``, naming the parameter) instead of failing with a
misleading "bad credentials".
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import requests
import tenacity
import trio
import urllib3.exceptions
from cs import CloudStack, CloudStackApiException, CloudStackException

from oma.config import OmaConfig
from pyapp.api import CONFLICT, OPERATION_FAILED, UPSTREAM_UNAVAILABLE, VALIDATION_FAILED, ApiError

log = logging.getLogger(__name__)

CLOUDSTACK_AUTH_FAILED = "CLOUDSTACK_AUTH_FAILED"
CLOUDSTACK_PERMISSION_DENIED = "CLOUDSTACK_PERMISSION_DENIED"
CLOUDSTACK_INVALID_PARAMETER = "CLOUDSTACK_INVALID_PARAMETER"
CLOUDSTACK_UNSIGNABLE_VALUE = "CLOUDSTACK_UNSIGNABLE_VALUE"
UPSTREAM_TIMEOUT = "UPSTREAM_TIMEOUT"

#: CloudStack's ``ApiErrorCode`` values the mapping knows by name.
UNAUTHORIZED: Final = 401
METHOD_NOT_ALLOWED: Final = 405
API_LIMIT_EXCEEDED: Final = 429
MALFORMED_PARAMETER_ERROR: Final = 430
PARAM_ERROR: Final = 431
UNSUPPORTED_ACTION_ERROR: Final = 432
INTERNAL_ERROR: Final = 530
ACCOUNT_ERROR: Final = 531
RESOURCE_UNAVAILABLE_ERROR: Final = 534
#: Account limits, capacity, allocation, resource in use, network rule conflicts: CloudStack's
#: state refuses the command as it is now.
STATE_ERRORS: Final = frozenset({ACCOUNT_ERROR, 532, 533, 535, 536, 537})

#: The ``jobstatus`` values of ``queryAsyncJobResult``.
JOB_PENDING, JOB_SUCCEEDED, JOB_FAILED = 0, 1, 2

#: Worker threads making CloudStack requests at once, in this process.
_LIMITER = trio.CapacityLimiter(8)
_READ_ONLY_PREFIXES = ("list", "query", "get")
#: Statuses a proxy answers when CloudStack did not run the request: safe to send again.
_NOT_RUN_STATUSES = frozenset({502, 503, 504})

KeySource = Literal["request", "stored"]


@dataclass(frozen=True)
class Login:
    """Where and as whom to call CloudStack. The keys never appear in a repr (nor a log)."""

    api_url: str
    api_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    #: Where the keys come from: this request's body (a key CloudStack refuses is the request's
    #: fault: 422) or the stored settings (their fault: 409).
    source: KeySource = "request"


@dataclass(frozen=True)
class ClientOptions:
    timeout: float = 30.0
    connect_timeout: float = 5.0
    job_timeout: float = 300.0
    attempts: int = 3
    #: Retries stop once this much time has gone since the first attempt.
    retry_deadline: float = 60.0
    backoff_initial: float = 0.5
    backoff_max: float = 5.0
    poll_initial: float = 0.2
    poll_max: float = 2.0

    @classmethod
    def from_config(cls, config: OmaConfig) -> ClientOptions:
        return cls(timeout=config.cloudstack_timeout, job_timeout=config.cloudstack_job_timeout)


class CloudStackError(ApiError):
    """A CloudStack call that failed, as the API's envelope says it: ``details`` has the
    command, CloudStack's ``errorcode`` and ``errortext`` (when it answered) and the job id
    (for a job)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        command: str,
        errorcode: int | None = None,
        errortext: str | None = None,
        job_id: str | None = None,
    ) -> None:
        details: dict[str, Any] = {"command": command}
        if errorcode is not None:
            details["cloudstack_errorcode"] = errorcode
        if errortext is not None:
            details["cloudstack_errortext"] = errortext
        if job_id is not None:
            details["job_id"] = job_id
        super().__init__(status, code, message, details)
        self.command = command
        self.errorcode = errorcode
        self.errortext = errortext
        self.job_id = job_id


def refuse_unsignable(params: Mapping[str, Any]) -> None:
    """Refuse (422) parameters ``cs`` would sign differently from CloudStack: a ``~`` in a name
    or a value (see the module doc)."""
    for key, value in params.items():
        for text in _texts(value):
            if "~" in key or "~" in text:
                raise ApiError(
                    422,
                    CLOUDSTACK_UNSIGNABLE_VALUE,
                    f"CloudStack parameter {key!r} contains '~', which CloudStack would refuse"
                    " (its signature check encodes '~' and the client library does not): remove it",
                    {"parameter": key},
                )


def _texts(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [t for k, v in value.items() for t in (str(k), *_texts(v))]
    if isinstance(value, list | tuple | set):
        return [t for v in value for t in _texts(v)]
    return [str(value)]


def is_read_only(command: str) -> bool:
    return command.startswith(_READ_ONLY_PREFIXES)


def _connect_failed(exc: BaseException) -> bool:
    """The connection was never made (refused, unreachable, connect timeout): the request did not
    leave. A name that does not resolve is not retried: it will not resolve in a second either."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if not isinstance(exc, requests.exceptions.ConnectionError) or isinstance(
        exc, requests.exceptions.SSLError
    ):
        return False
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, urllib3.exceptions.NewConnectionError) and not isinstance(
        reason, urllib3.exceptions.NameResolutionError
    )


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def retryable(exc: BaseException, read_only: bool) -> bool:
    """Whether ``exc`` may be answered by sending the same command again (module doc)."""
    if _connect_failed(exc):
        return True
    status = _http_status(exc) if isinstance(exc, CloudStackException) else None
    if status == API_LIMIT_EXCEEDED or status in _NOT_RUN_STATUSES:
        return True
    if not read_only:
        return False
    if isinstance(exc, requests.exceptions.Timeout | requests.exceptions.ConnectionError):
        return not isinstance(exc, requests.exceptions.SSLError)
    return status is not None and status >= 500


def map_error(
    command: str, errorcode: int, errortext: str, source: KeySource, *, job_id: str | None = None
) -> CloudStackError:
    """CloudStack's error (an HTTP answer or a failed job) as the OMA answers it:

    - 401 (credentials, signature, expiry): ``CLOUDSTACK_AUTH_FAILED``, 422 for keys of the
      request, 409 for stored keys;
    - 432 (command unknown or not allowed), 405: ``CLOUDSTACK_PERMISSION_DENIED``, 422 / 409;
    - 430, 431 (malformed or invalid parameter, a UUID naming nothing): 422
      ``CLOUDSTACK_INVALID_PARAMETER``;
    - 531-533, 535-537 (account, limits, capacity, resource in use): 409 ``CONFLICT``;
    - 429 (API limit): 503 ``UPSTREAM_UNAVAILABLE``;
    - 530, 534 and anything else: 502 ``OPERATION_FAILED``.
    """
    settings_fault = 422 if source == "request" else 409
    where = "" if job_id is None else f" (job {job_id})"
    said = f"CloudStack {command}{where}: {errortext or 'no error text'} (error {errorcode})"
    kw: dict[str, Any] = {
        "command": command,
        "errorcode": errorcode,
        "errortext": errortext,
        "job_id": job_id,
    }
    if errorcode == UNAUTHORIZED:
        whose = "given" if source == "request" else "stored (update them with POST /ossea/config)"
        return CloudStackError(
            settings_fault,
            CLOUDSTACK_AUTH_FAILED,
            f"CloudStack refused the {whose} API key and secret key: {errortext or 'unauthorized'}",
            **kw,
        )
    if errorcode in (UNSUPPORTED_ACTION_ERROR, METHOD_NOT_ALLOWED):
        return CloudStackError(
            settings_fault,
            CLOUDSTACK_PERMISSION_DENIED,
            f"the CloudStack account of this API key may not call {command}: {errortext}",
            **kw,
        )
    if errorcode in (MALFORMED_PARAMETER_ERROR, PARAM_ERROR):
        return CloudStackError(422, CLOUDSTACK_INVALID_PARAMETER, said, **kw)
    if errorcode in STATE_ERRORS:
        return CloudStackError(409, CONFLICT, said, **kw)
    if errorcode == API_LIMIT_EXCEEDED:
        return CloudStackError(503, UPSTREAM_UNAVAILABLE, f"{said}: try again later", **kw)
    return CloudStackError(502, OPERATION_FAILED, said, **kw)


def _transport_error(command: str, api_url: str, exc: BaseException) -> CloudStackError:
    """A request that got no CloudStack answer (no connection, timeout, not CloudStack's API)."""
    if isinstance(exc, requests.exceptions.Timeout):
        return CloudStackError(
            504,
            UPSTREAM_TIMEOUT,
            f"CloudStack at {api_url} did not answer {command} in time",
            command=command,
        )
    if isinstance(exc, requests.exceptions.SSLError):
        why = "TLS failed (certificate not trusted?)"
    elif isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.MissingSchema):
        return CloudStackError(
            422, VALIDATION_FAILED, f"not a usable CloudStack API URL: {api_url}", command=command
        )
    elif isinstance(exc, requests.exceptions.ConnectionError):
        reason = getattr(exc.args[0], "reason", None) if exc.args else None
        if isinstance(reason, urllib3.exceptions.NameResolutionError):
            why = "its host name does not resolve"
        elif isinstance(reason, urllib3.exceptions.NewConnectionError):
            why = "the connection was refused or the host is unreachable"
        else:
            why = "the connection was lost"
    elif isinstance(exc, CloudStackException):
        status = _http_status(exc)
        why = f"the answer is not CloudStack's API (HTTP {status}; the URL should end in /client/api)"
    else:
        why = type(exc).__name__
    return CloudStackError(
        502, UPSTREAM_UNAVAILABLE, f"cannot use CloudStack at {api_url} for {command}: {why}", command=command
    )


def _api_error(command: str, source: KeySource, exc: CloudStackApiException) -> CloudStackError:
    error = exc.error if isinstance(exc.error, Mapping) else {}
    status = _http_status(exc) or 0
    code = error.get("errorcode", status)
    text = error.get("errortext", "")
    return map_error(command, code if isinstance(code, int) else status, str(text), source)


class _TimedSession(requests.Session):
    """A session whose every request has (connect, read) timeouts: ``cs`` passes one number for
    both, and a host that does not answer the connection should not take the read's time."""

    def __init__(self, connect: float, read: float) -> None:
        super().__init__()
        self._timeouts = (connect, read)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        kwargs["timeout"] = self._timeouts
        return super().send(request, **kwargs)


def _log_retry(command: str) -> Callable[[tenacity.RetryCallState], None]:
    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning(
            "CloudStack %s failed (%s): retrying in %.1f s",
            command,
            type(exc).__name__ if exc is not None else "?",
            state.next_action.sleep if state.next_action is not None else 0.0,
            extra={"action": "cloudstack_retry", "command": command, "attempt": state.attempt_number},
        )

    return before_sleep


class CloudStackClient:
    """CloudStack's API for one login. Close it (``with``) to release its connections."""

    def __init__(self, login: Login, options: ClientOptions | None = None) -> None:
        refuse_unsignable({"apiKey": login.api_key})
        self.login = login
        self.options = options or ClientOptions()
        options = self.options
        self._api = CloudStack(
            endpoint=login.api_url,
            key=login.api_key,
            secret=login.secret_key,
            timeout=max(1, math.ceil(options.timeout)),
            method="post",  # keys and signature in the body, never in a URL a proxy logs
            retry=0,  # retries are this module's, with its rules
            session=_TimedSession(min(options.connect_timeout, options.timeout), options.timeout),
        )

    def __enter__(self) -> CloudStackClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._api.session.close()

    async def request(self, command: str, **params: Any) -> dict[str, Any]:
        """One synchronous command: the body of its answer (``{}`` for an empty list)."""
        answer = await self._call(command, params, fetch_list=False)
        return answer if isinstance(answer, dict) else {}

    async def list(self, command: str, **params: Any) -> list[dict[str, Any]]:
        """Every item a ``list*`` command answers, all pages (500 a page)."""
        answer = await self._call(command, params, fetch_list=True)
        return [item for item in answer if isinstance(item, dict)] if isinstance(answer, list) else []

    async def submit(self, command: str, **params: Any) -> dict[str, Any]:
        """Start an asynchronous command: its answer (``jobid``, and ``id`` of the object)."""
        answer = await self.request(command, **params)
        if not isinstance(answer.get("jobid"), str):
            raise CloudStackError(
                502, OPERATION_FAILED, f"CloudStack {command} answered without a job id", command=command
            )
        return answer

    async def job(self, command: str, **params: Any) -> dict[str, Any]:
        """An asynchronous command, waited for: its ``jobresult``. A synchronous answer (no
        ``jobid``: some CloudStack versions run a command at once) is returned as it is."""
        answer = await self.request(command, **params)
        job_id = answer.get("jobid")
        if not isinstance(job_id, str):
            return answer
        return await self.wait_job(command, job_id)

    async def wait_job(self, command: str, job_id: str) -> dict[str, Any]:
        """Poll ``queryAsyncJobResult`` until the job ends (or the job deadline passes: 504)."""
        deadline = trio.current_time() + self.options.job_timeout
        interval = self.options.poll_initial
        while True:
            answer = await self.request("queryAsyncJobResult", jobid=job_id)
            status = answer.get("jobstatus")
            result = answer.get("jobresult")
            result = result if isinstance(result, dict) else {}
            if status == JOB_SUCCEEDED:
                return result
            if status == JOB_FAILED:
                code = result.get("errorcode")
                raise map_error(
                    command,
                    code if isinstance(code, int) else INTERNAL_ERROR,
                    str(result.get("errortext", "")),
                    self.login.source,
                    job_id=job_id,
                )
            if status != JOB_PENDING:
                raise CloudStackError(
                    502,
                    OPERATION_FAILED,
                    f"CloudStack job {job_id} of {command} has an unknown status {status!r}",
                    command=command,
                    job_id=job_id,
                )
            if trio.current_time() + interval > deadline:
                raise CloudStackError(
                    504,
                    UPSTREAM_TIMEOUT,
                    f"CloudStack job {job_id} of {command} did not end within"
                    f" {self.options.job_timeout:g} s (it may still end: see the job in CloudStack)",
                    command=command,
                    job_id=job_id,
                )
            await trio.sleep(interval)
            interval = min(interval * 1.5, self.options.poll_max)

    async def _call(self, command: str, params: dict[str, Any], *, fetch_list: bool) -> Any:
        refuse_unsignable(params)
        read_only = is_read_only(command)
        send = functools.partial(self._send, command, dict(params), fetch_list)
        options = self.options
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(lambda exc: retryable(exc, read_only)),
            wait=tenacity.wait_exponential_jitter(
                multiplier=options.backoff_initial, max=options.backoff_max, jitter=options.backoff_initial
            ),
            stop=tenacity.stop_after_attempt(options.attempts)
            | tenacity.stop_after_delay(options.retry_deadline),
            sleep=trio.sleep,
            before_sleep=_log_retry(command),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await trio.to_thread.run_sync(send, limiter=_LIMITER, abandon_on_cancel=read_only)
        except CloudStackApiException as exc:
            raise _api_error(command, self.login.source, exc) from None
        except (CloudStackException, requests.exceptions.RequestException) as exc:
            raise _transport_error(command, self.login.api_url, exc) from None
        except urllib3.exceptions.LocationValueError:  # a URL requests could not even parse
            raise CloudStackError(
                422,
                VALIDATION_FAILED,
                f"not a usable CloudStack API URL: {self.login.api_url}",
                command=command,
            ) from None
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _send(self, command: str, params: dict[str, Any], fetch_list: bool) -> Any:
        """In a worker thread: the library's call."""
        handler: Callable[..., Any] = getattr(self._api, command)
        return handler(fetch_list=fetch_list, **params)
