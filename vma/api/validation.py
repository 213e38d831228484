"""Small validators for request bodies: every failure is a 400 ``INVALID_REQUEST`` naming the field."""

from __future__ import annotations

import re
from typing import Any

from vma.api.errors import ApiError
from vma.vsphere.client import TLS_MODES, VCenterLogin

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")
#: A vCenter: ``host``, ``host:port`` or an http(s) URL, in ASCII (an IDN host in its ``xn--`` form).
VCENTER = re.compile(
    r"^(?:https?://)?(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?(?:/[!-~]*)?$"
)


def text(body: dict[str, Any], key: str, *, required: bool = True, max_len: int = 1024) -> str:
    value = body.get(key)
    if value is None or value == "":
        if required:
            raise ApiError.invalid(f"{key} is required")
        return ""
    if not isinstance(value, str) or len(value) > max_len:
        raise ApiError.invalid(f"{key} must be a string of at most {max_len} characters")
    return value


def job_id(body: dict[str, Any]) -> str:
    value = text(body, "job_id", max_len=200)
    if not JOB_ID.match(value):
        raise ApiError.invalid("Invalid job_id format (letters, digits and . _ : - only)")
    return value


def vcenter(body: dict[str, Any]) -> str:
    value = text(body, "vcenter", max_len=1024)
    match = VCENTER.match(value)
    host = match["host"] if match else ""
    try:
        ok = bool(match) and (host.startswith("[") or len(host.encode("idna")) <= 253)
    except UnicodeError:  # a label empty or longer than 63 characters
        ok = False
    if not ok:
        raise ApiError.invalid("vcenter must be a host name, host:port or an http(s) URL (ASCII)")
    return value


def vcenter_login(body: dict[str, Any]) -> VCenterLogin:
    """The vCenter login of a request: ``vcenter``, ``username``, ``password``, and how to check
    vCenter's certificate, ``tls_mode`` (``verify`` unless given) and ``tls_thumbprint``."""
    mode = text(body, "tls_mode", required=False, max_len=20) or "verify"
    if mode not in TLS_MODES:
        raise ApiError.invalid(f"tls_mode must be one of {', '.join(TLS_MODES)}")
    try:
        return VCenterLogin(
            vcenter(body),
            text(body, "username"),
            text(body, "password"),
            tls_mode=mode,  # type: ignore[arg-type]  # checked against TLS_MODES above
            tls_thumbprint=text(body, "tls_thumbprint", required=False, max_len=200),
        )
    except ValueError as e:
        raise ApiError.invalid(str(e)) from e
