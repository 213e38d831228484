"""The HTTP side of the double: CloudStack's ``/client/api`` and the lab-only ``/lab/...`` endpoints.

``/client/api`` (GET or POST) takes its parameters as CloudStack's servlet does: the form body of a
POST (``application/x-www-form-urlencoded``), then the query string, whose values win
(``ApiServlet.utf8Fixup`` re-reads the query string and overrides; of a name repeated in the query
string the last value stays). Then, as ``ApiServlet.processRequestInContext`` and
``ApiServer.handleRequest`` do: verify the signature (401 for any failure, including an unknown
command: CloudStack checks the command exists inside ``verifyRequest``), refuse control characters
in values (431), process the parameters, run the command.

Every answer is JSON (``application/json; charset=UTF-8``). CloudStack answers XML unless a
request says ``response=json``; the double speaks only JSON, so a request without
``response=json`` is refused (432, ``errorresponse``) instead of being answered in a format its
client did not ask for -- a client that forgot the parameter fails here as it would against
CloudStack.

``/lab/faults``, ``/lab/state`` and ``/lab/vms/<id>/console`` (what a VM printed on its serial
console; ``/lab/vms/<id>/firmware``: its firmware's messages) are the double's own (not
CloudStack's, not signed): answered only to loopback clients.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import trio
from pydantic import ValidationError
from quart import Response, request
from quart_trio import QuartTrio

from . import render
from .cloud import Cloud, Options
from .commands import COMMANDS, parse_args
from .errors import ApiErrorCode, CloudStackError, ServerApiError
from .faults import Fault, FaultMode, Faults
from .jobs import JobRunner
from .seed import Seed
from .signing import Credentials, verify_request

log = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json; charset=UTF-8"
UNVERIFIED = "unable to verify user credentials and/or request signature"
#: ApiServer.CONTROL_CHARACTERS: 0-8, 11, 12, 14-31 and 127 (tab, LF and CR are allowed)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass
class LabSettings:
    seed: Seed
    options: Options
    credentials: Credentials
    job_delay: float = 0.3
    faults: Faults = field(default_factory=Faults)


def request_params(query: bytes, body: bytes) -> dict[str, str]:
    """The parameter map CloudStack's servlet builds from a request."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True):
        params.setdefault(name, value)
    for name, value in parse_qsl(query.decode("utf-8", errors="replace"), keep_blank_values=True):
        params[name] = value
    return params


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class CloudStackApi:
    """``/client/api``: from a parameter map to CloudStack's answer."""

    def __init__(self, cloud: Cloud, runner: JobRunner, credentials: Credentials) -> None:
        self.cloud = cloud
        self.runner = runner
        self.credentials = credentials

    async def handle(self, params: dict[str, str]) -> Answer:
        if params.get("response", "").lower() != "json":
            text = (
                "The lab CloudStack double answers only response=json (CloudStack would answer this in XML)"
            )
            return Answer(432, {"errorresponse": render.error_body(432, text)})
        refusal = verify_request(params, COMMANDS, self.credentials, datetime.now(UTC))
        if refusal is not None:
            log.info("request refused: %s", refusal, extra={"action": "cloudstack_api"})
            return Answer(401, {self._unverified_name(params): render.error_body(401, UNVERIFIED)})
        command = COMMANDS[params["command"]]
        try:
            return Answer(200, {command.response_name: await self._run(command.name, params)})
        except CloudStackError as exc:
            name = (
                "errorresponse"
                if exc.code == ApiErrorCode.UNSUPPORTED_ACTION_ERROR
                else command.response_name
            )
            header = exc.text.encode("latin-1", errors="replace").decode("latin-1").replace("\n", " ")
            return Answer(
                exc.code,
                {name: render.error_body(exc.code, exc.text, exc.cs_error_code)},
                {"X-Description": header},
            )
        except Exception as exc:  # a defect in the double: CloudStack's catch-all answer, never a bare 500
            log.exception("%s failed", command.name)
            text = f"{type(exc).__name__}: {exc}"
            return Answer(530, {command.response_name: render.error_body(530, text, 9999)})

    @staticmethod
    def _unverified_name(params: dict[str, str]) -> str:
        # getSerializedApiError: the command's response name when the command exists,
        # "errorresponse" when it does not or there were no parameters at all, and the string
        # "null" (a null name appended to the JSON) when parameters came without a command.
        command = params.get("command")
        if command is None:
            return "null" if params else "errorresponse"
        known = COMMANDS.get(command)
        return known.response_name if known is not None else "errorresponse"

    async def _run(self, name: str, params: dict[str, str]) -> dict[str, Any]:
        command = COMMANDS[name]
        for key, value in params.items():  # ApiServer.checkCharacterInkParams
            if _CONTROL.search(value):
                raise ServerApiError(
                    ApiErrorCode.PARAM_ERROR,
                    f"Received value containing illegal ASCII non-printable characters for parameter {key}",
                )
        fault = self.cloud.faults.take(command.name, FaultMode.ERROR)
        if fault is not None:
            raise ServerApiError(fault.errorcode, fault.errortext)
        args = parse_args(self.cloud, command, params)
        if command.sync is not None:
            if command.mutates:
                async with self.cloud.lock:
                    return await command.sync(self.cloud, args)
            return await command.sync(self.cloud, args)
        assert command.start is not None
        async with self.cloud.lock:
            start = await command.start(self.cloud, args)
            job = await self.runner.submit(command.name, command.java_class, start)
        if start.created_id is not None:
            return {"id": start.created_id, "jobid": job.id}
        return {"jobid": job.id}


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return Response(text, status=status, content_type=JSON_CONTENT_TYPE, headers=headers)


def _unusable(fault: Fault) -> str | None:
    command = COMMANDS.get(fault.command)
    if command is None:
        return f"the double does not implement {fault.command}"
    if fault.mode in (FaultMode.JOB_FAILURE, FaultMode.DELAY) and command.start is None:
        return f"{fault.command} is synchronous: it has no job to fail or delay"
    if fault.mode == FaultMode.DROP_DEVICE_LINK and fault.command != "attachVolume":
        return "drop_device_link applies to attachVolume"
    return None


def _from_loopback() -> bool:
    try:
        return ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        return False


def create_app(settings: LabSettings) -> QuartTrio:
    app = QuartTrio(__name__)
    # Pending jobs are cancelled at once at shutdown (and failed at the next start); a job whose
    # body started finishes anyway, its body is shielded.
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = None
    cloud = Cloud(settings.seed, settings.options, settings.faults)
    runner = JobRunner(cloud, settings.job_delay, app.add_background_task)
    api = CloudStackApi(cloud, runner, settings.credentials)
    app.extensions["lab_cloud"] = cloud

    @app.before_serving
    async def open_cloud() -> None:
        await cloud.open()
        app.add_background_task(cloud.watch_guests)

    @app.after_serving
    async def stop_guests() -> None:
        with trio.CancelScope(shield=True):
            await cloud.shutdown()

    @app.route("/client/api", methods=["GET", "POST"])
    async def client_api() -> Response:
        body = b""
        if request.method == "POST" and (request.mimetype or "") == "application/x-www-form-urlencoded":
            body = await request.get_data(cache=True, as_text=False, parse_form_data=False)
        answer = await api.handle(request_params(request.query_string, body))
        return _json(answer.body, answer.status, answer.headers)

    @app.route("/lab/faults", methods=["GET", "POST", "DELETE"])
    async def lab_faults() -> Response:
        if not _from_loopback():
            return _json({"error": "the lab endpoints answer loopback clients only"}, 403)
        if request.method == "POST":
            try:
                fault = Fault.model_validate_json(
                    await request.get_data(cache=True, as_text=False, parse_form_data=False)
                )
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "(body)"
                return _json({"error": f"{where}: {first['msg']}"}, 400)
            problem = _unusable(fault)
            if problem is not None:
                return _json({"error": problem}, 400)
            settings.faults.add(fault)
            return _json({"pending": [f.model_dump(mode="json") for f in settings.faults.pending()]}, 201)
        if request.method == "DELETE":
            settings.faults.clear()
        return _json({"pending": [f.model_dump(mode="json") for f in settings.faults.pending()]})

    @app.route("/lab/state", methods=["GET"])
    async def lab_state() -> Response:
        if not _from_loopback():
            return _json({"error": "the lab endpoints answer loopback clients only"}, 403)
        return _json(cloud.lab_state())

    @app.route("/lab/vms/<vm_id>/<log_name>", methods=["GET"])
    async def lab_vm_log(vm_id: str, log_name: str) -> Response:
        if not _from_loopback():
            return _json({"error": "the lab endpoints answer loopback clients only"}, 403)
        if log_name not in ("console", "firmware"):
            return _json({"error": f"no lab endpoint /lab/vms/<id>/{log_name}: console or firmware"}, 404)
        vm = cloud.vm(vm_id)
        if vm is None or vm.is_oma:
            return _json({"error": f"no user VM {vm_id}"}, 404)
        path = cloud.host.console(vm.id) if log_name == "console" else cloud.host.firmware_log(vm.id)
        try:
            text = await trio.to_thread.run_sync(path.read_bytes)
        except FileNotFoundError:
            return _json({"error": f"VM {vm_id} has not run: it has no {log_name} log"}, 404)
        return Response(
            text,
            content_type="text/plain; charset=utf-8",
            headers={"X-Lab-VM-State": vm.state, "Cache-Control": "no-store"},
        )

    return app
