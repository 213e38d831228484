"""``POST /api/v1/vms/{vm_id}/power-off`` and ``POST /api/v1/vms/{vm_id}/power-on``: the source VM
off for a live failover's cut-over, on again at its rollback (additions to the seed, docs/vma.md).

``vm_id`` is the VM's managed object id (discovery's ``id``, ``vm-143``). The body is the vCenter
login as ``/discover`` takes it, and for power-off ``force`` (default true), ``shutdown_timeout``
(seconds, default 120, 0 to 3600) and ``final_pass`` (default false); what they do is
:mod:`vma.replication.power`. Both calls are idempotent: a VM already in the asked state is a
success saying so (``outcome`` ``already_off`` / ``already_on``).

Errors: 404 ``VM_NOT_FOUND`` (vCenter has no such VM), 409 ``VM_BUSY`` (a job of this VMA works on
the VM; ``active_jobs`` lists them besides the envelope), 409 / 504 ``OPERATION_FAILED`` (``force``
false and the guest could not / did not in time shut down), 502 ``OPERATION_FAILED`` (vCenter
refused the login or failed)."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable
from typing import Any

from quart import Blueprint, Response, jsonify
from quart_schema import document_request, document_response

from pyapp.logs import log_context
from vma.api.errors import ApiError, json_object, utc_now_iso
from vma.api.schemas import PowerOffRequest, PowerOnRequest, refuse_unknown_fields
from vma.api.validation import vcenter_login
from vma.replication import power
from vma.state import state
from vma.vsphere.client import VmNotFound, VSphereError

bp = Blueprint("power", __name__)
log = logging.getLogger(__name__)

VM_NOT_FOUND = "VM_NOT_FOUND"
VM_BUSY = "VM_BUSY"
#: A managed object id: ``vm-143`` on vCenter, a number on a host.
VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
MAX_SHUTDOWN_TIMEOUT = 3600.0


def _vm_id(raw: str) -> str:
    if not VM_ID.match(raw):
        raise ApiError.invalid("vm_id must be a VM's managed object id such as vm-143")
    return raw


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise ApiError.invalid(f"{key} must be true or false")
    return value


def _shutdown_timeout(body: dict[str, Any]) -> float:
    value = body.get("shutdown_timeout", power.PowerOffOptions.shutdown_timeout)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not 0 <= value <= MAX_SHUTDOWN_TIMEOUT:
        raise ApiError.invalid(
            f"shutdown_timeout must be a number of seconds from 0 to {MAX_SHUTDOWN_TIMEOUT:.0f}"
        )
    return float(value)


def _busy(exc: power.VmBusy) -> Response:
    response: Response = jsonify(
        {"error": str(exc), "code": VM_BUSY, "timestamp": utc_now_iso(), "active_jobs": exc.job_ids}
    )
    response.status_code = 409
    return response


async def _answer(vm_id: str, action: str, call: Awaitable[power.PowerResult]) -> Any:
    """Run the power call, rendering its errors (the module doc) and logging what it did."""
    with log_context(action=action):
        try:
            result = await call
        except VmNotFound as e:
            raise ApiError(404, VM_NOT_FOUND, str(e)) from e
        except power.VmBusy as e:
            log.warning("%s refused: %s", action, e, extra={"vm": vm_id})
            return _busy(e)
        except power.PowerOffRefused as e:
            raise ApiError.failed(str(e), status=e.status) from e
        except VSphereError as e:
            log.warning("%s failed: %s", action, e, extra={"vm": vm_id})
            raise ApiError.failed(str(e)) from e
        log.info(result.message, extra={"vm": vm_id, "outcome": result.outcome})
    return result.as_dict()


@bp.post("/vms/<vm_id>/power-off")
@document_request(PowerOffRequest)
@document_response(power.PowerResult)
async def power_off(vm_id: str) -> Any:
    vm_id = _vm_id(vm_id)
    body = refuse_unknown_fields(await json_object(), PowerOffRequest)
    login = vcenter_login(body)
    options = power.PowerOffOptions(
        force=_flag(body, "force", True),
        shutdown_timeout=_shutdown_timeout(body),
        final_pass=_flag(body, "final_pass", False),
    )
    if not options.force and options.shutdown_timeout == 0:
        raise ApiError.invalid("with force false, shutdown_timeout 0 leaves nothing to do")
    st = state()
    jobs = st.tracker.all()
    call = power.power_off(login, vm_id, options, jobs, insecure=st.config.vcenter_insecure)
    return await _answer(vm_id, "power_off", call)


@bp.post("/vms/<vm_id>/power-on")
@document_request(PowerOnRequest)
@document_response(power.PowerResult)
async def power_on(vm_id: str) -> Any:
    vm_id = _vm_id(vm_id)
    body = refuse_unknown_fields(await json_object(), PowerOnRequest)
    login = vcenter_login(body)
    call = power.power_on(login, vm_id, insecure=state().config.vcenter_insecure)
    return await _answer(vm_id, "power_on", call)
