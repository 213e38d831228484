"""Request verification, written from CloudStack's ``ApiServer.verifyRequest`` (server module).

What CloudStack does with an API-key request, step by step, and so what this module does:

1. No ``command`` parameter, or a command the server does not know: refused.
2. Every parameter name except ``signature`` (compared case-insensitively) is taken, **sorted as
   Java sorts strings** (UTF-16 code units, case-sensitive: ``apiKey`` sorts before ``command``
   because ``a`` < ``c``, and an upper-case name before any lower-case one).
3. Each value (the first, when a name is repeated) is encoded with ``java.net.URLEncoder.encode(v,
   "UTF-8")`` and then every ``+`` becomes ``%20``. URLEncoder leaves ``a-z A-Z 0-9 . - * _``
   as they are, turns a space into ``+`` and every other byte of the UTF-8 form into ``%XX``
   with upper-case hex -- so ``~`` becomes ``%7E`` (Python's ``quote`` leaves ``~`` alone:
   a client that signs with it, like the ``cs`` library, is refused for any value holding ``~``).
4. ``name=value`` pairs are joined with ``&`` and the whole string is lower-cased (names, values
   and the hex digits alike).
5. HMAC-SHA1 of that string with the secret key, Base64-encoded (standard alphabet, padded),
   compared in constant time with ``signature``.
6. With ``signatureVersion=3`` the request must carry ``expires`` (a date with an offset, in the
   formats ``DateUtil.parseTZDateString`` reads), and is refused once that moment has passed. Any
   other ``signatureVersion`` means no expiry check. Both parameters are signed like any other.

A missing ``signature`` or ``apiKey`` is refused, and so is an ``apiKey`` that names no user.
Every refusal is the same to the client (HTTP 401, "unable to verify user credentials and/or
request signature"); :func:`verify_request` returns why, for the log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

#: The bytes java.net.URLEncoder leaves as they are.
_URLENCODER_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-*_")


@dataclass(frozen=True)
class Credentials:
    """The one user the double knows: its API key and secret key."""

    api_key: str
    secret_key: str


def java_url_encode(value: str) -> str:
    """``java.net.URLEncoder.encode(value, "UTF-8")``."""
    out: list[str] = []
    for byte in value.encode("utf-8", errors="replace"):
        if byte in _URLENCODER_SAFE:
            out.append(chr(byte))
        elif byte == 0x20:
            out.append("+")
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def _java_sort_key(name: str) -> bytes:
    # Java compares strings by UTF-16 code unit; big-endian UTF-16 bytes compare the same way.
    return name.encode("utf-16-be", errors="surrogatepass")


def string_to_sign(params: Mapping[str, str]) -> str:
    """The lower-cased ``name=value&...`` string CloudStack signs (steps 2 to 4)."""
    pairs = [
        f"{name}={java_url_encode(params[name]).replace('+', '%20')}"
        for name in sorted(params, key=_java_sort_key)
        if name.lower() != "signature"
    ]
    return "&".join(pairs).lower()


def compute_signature(secret_key: str, unsigned: str) -> str:
    digest = hmac.new(secret_key.encode("utf-8"), unsigned.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


_DATE = r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})"
# The formats DateUtil.parseTZDateString tries, in its order. Each regex yields the date, the
# time, an optional fraction and the offset (None for "Z"/"z").
_EXPIRES_FORMATS: tuple[re.Pattern[str], ...] = (
    # DateTimeFormatter.ISO_OFFSET_DATE_TIME: seconds and a 0-9 digit fraction optional,
    # offset "Z" or +HH:MM[:SS]
    re.compile(_DATE + r"(?::(\d{2})(?:\.(\d{0,9}))?)?(?:(Z)|([+-]\d{2}):(\d{2})(?::(\d{2}))?)"),
    # yyyy-MM-dd'T'HH:mm:ssZ: offset +HHMM (what the cs library sends)
    re.compile(_DATE + r":(\d{2})()()([+-]\d{2})(\d{2})()"),
    # yyyy-MM-dd'T'HH:mm:ss.SSSSSSX: exactly six fraction digits, offset Z, +HH or +HHMM
    re.compile(_DATE + r":(\d{2})\.(\d{6})(?:(Z)|([+-]\d{2})(\d{2})?)()"),
    # yyyy-MM-dd'T'HH:mm:ss.SSSSSSZ
    re.compile(_DATE + r":(\d{2})\.(\d{6})()([+-]\d{2})(\d{2})()"),
    # yyyy-MM-dd'T'HH:mm:ss'Z'Z (legacy): a literal Z followed by +HHMM
    re.compile(_DATE + r":(\d{2})()Z()([+-]\d{2})(\d{2})()"),
)


def parse_expires(text: str) -> datetime | None:
    """The moment ``expires`` names, or None when CloudStack could not parse it either.
    (``yyyy-MM-dd'T'HH:mm:ss.SSSSSS'Z'``, also in CloudStack's list, carries no offset and so
    never parses into the OffsetDateTime it asks for: refused here too.)"""
    for pattern in _EXPIRES_FORMATS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        year, month, day, hour, minute, second, fraction, zulu, off_h, off_m, off_s = m.groups()
        try:
            sign = -1 if off_h and off_h.startswith("-") else 1
            offset = timedelta(hours=abs(int(off_h or 0)), minutes=int(off_m or 0), seconds=int(off_s or 0))
            if zulu or not off_h:
                offset = timedelta(0)
            micros = int((fraction or "").ljust(6, "0")[:6] or 0)
            return datetime(
                int(year),
                int(month),
                int(day),
                int(hour),
                int(minute),
                int(second or 0),
                micros,
                tzinfo=timezone(sign * offset),
            )
        except ValueError:  # a month 13, an offset beyond 18 hours: DateTimeParseException
            continue
    return None


def verify_request(
    params: Mapping[str, str], known_commands: Collection[str], credentials: Credentials, now: datetime
) -> str | None:
    """None when CloudStack would accept the request's signature, else why it refuses it."""
    command = params.get("command")
    if command is None:
        return "missing command"
    if command not in known_commands:
        return f"the command {command} does not exist or is not available"
    signature = api_key = signature_version = expires = None
    for name in sorted(params, key=_java_sort_key):  # the last of names differing in case wins
        value = params[name]
        lowered = name.lower()
        if lowered == "signature":
            signature = value
        elif lowered == "apikey":
            api_key = value
        elif lowered == "signatureversion":
            signature_version = value
        elif lowered == "expires":
            expires = value
    if signature is None or api_key is None:
        return "missing signature or apiKey"
    if signature_version == "3":
        if expires is None:
            return "signatureVersion 3 without expires"
        expires_at = parse_expires(expires)
        if expires_at is None:
            return f"unparseable expires {expires!r}"
        if expires_at < now:
            return "request expired"
    if api_key != credentials.api_key:
        return "apiKey does not map to a valid user"
    computed = compute_signature(credentials.secret_key, string_to_sign(params))
    if not hmac.compare_digest(signature.encode("utf-8"), computed.encode("utf-8")):
        return "signature mismatch"
    return None
