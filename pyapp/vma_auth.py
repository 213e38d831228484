"""How the OMA proves itself to the VMA: each request to the VMA's API is signed with the secret
the OMA issued at the VMA's enrollment (the VMA keeps it in ``oma_secret_file``, the OMA in
``OMA_VMA_SECRET_FILE``).

``Authorization: Mover-HMAC ts=<unix seconds>,nonce=<32 hex>,sig=<64 hex>`` where ``sig`` is
HMAC-SHA256, keyed with the secret, of::

    mover-vma-api-v1 \\n METHOD \\n path \\n query \\n ts \\n nonce \\n sha256(body) hex

The VMA accepts a signature only within ``WINDOW`` seconds of its own clock and only once (it
remembers the nonces of the window), and compares in constant time. The secret itself never
travels. See docs/vma.md, "Who may call the VMA".
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

SCHEME = "Mover-HMAC"
CONTEXT = b"mover-vma-api-v1"
#: Seconds a signature stays valid either side of the VMA's clock.
WINDOW = 300.0
MAX_NONCES = 100_000
_HEADER = re.compile(r"^Mover-HMAC ts=([0-9]{1,12}),nonce=([0-9a-f]{32}),sig=([0-9a-f]{64})$")


class AuthFailed(Exception):
    """A request without a valid signature; the message is safe to show the caller."""


def _message(method: str, path: str, query: str, ts: int, nonce: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return b"\n".join(
        [
            CONTEXT,
            method.upper().encode(),
            path.encode(),
            query.encode(),
            str(ts).encode(),
            nonce.encode(),
            digest.encode(),
        ]
    )


def _sig(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, method: str, path: str, query: str, body: bytes, *, now: float | None = None) -> str:
    """The ``Authorization`` header value for one request."""
    ts = int(time.time() if now is None else now)
    nonce = secrets.token_hex(16)
    return (
        f"{SCHEME} ts={ts},nonce={nonce},sig={_sig(secret, _message(method, path, query, ts, nonce, body))}"
    )


@dataclass
class Verifier:
    """Checks signed requests; remembers the nonces seen within the window (no replay)."""

    window: float = WINDOW
    _seen: dict[str, float] = field(default_factory=dict)

    def verify(
        self, secret: str, header: str | None, method: str, path: str, query: str, body: bytes
    ) -> None:
        if not secret:
            raise AuthFailed("this VMA holds no enrollment secret (oma_secret_file): it accepts no requests")
        if not header:
            raise AuthFailed(f"authentication required ({SCHEME} signature of the enrolled OMA)")
        m = _HEADER.match(header.strip())
        if m is None:
            raise AuthFailed(f"malformed Authorization header (expected {SCHEME} ts=...,nonce=...,sig=...)")
        ts, nonce, sig = int(m.group(1)), m.group(2), m.group(3)
        now = time.time()
        expected = _sig(secret, _message(method, path, query, ts, nonce, body))
        if not hmac.compare_digest(expected, sig):
            raise AuthFailed("invalid signature")
        if abs(now - ts) > self.window:
            raise AuthFailed(f"signature expired (clocks differ by more than {self.window:.0f} s?)")
        self._prune(now)
        if nonce in self._seen:
            raise AuthFailed("signature already used (replay)")
        if len(self._seen) >= MAX_NONCES:
            raise AuthFailed("too many signed requests in the window")
        self._seen[nonce] = ts

    def _prune(self, now: float) -> None:
        stale = [n for n, ts in self._seen.items() if now - ts > self.window]
        for n in stale:
            del self._seen[n]


@dataclass
class SecretFile:
    """A secret read from a file, re-read when the file changes (a new enrollment needs no
    restart); missing or unreadable: the empty string."""

    path: Path | None
    _stamp: tuple[int, int] | None = None
    _value: str = ""

    def read(self) -> str:
        if self.path is None:
            return ""
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self._value = None, ""
            return ""
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self._value = self.path.read_text().strip()
            except OSError:
                self._value = ""
            self._stamp = stamp
        return self._value


class SignedAuth(httpx.Auth):
    """httpx authentication that signs each request with ``secret()`` (no header when empty)."""

    requires_request_body = True

    def __init__(self, secret: Callable[[], str]) -> None:
        self._secret = secret

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        secret = self._secret()
        if secret:
            request.headers["Authorization"] = sign(
                secret, request.method, request.url.path, request.url.query.decode(), request.content
            )
        yield request
