"""Secrets of the OMA: AES-256-GCM for secrets at rest, argon2id for passwords, sha256 for tokens.

The AES key lives in one file (default ``<data-dir>/secrets/credentials.key``), created with mode
0600 at first start from ``os.urandom`` and written to a temporary name, fsynced, then renamed, so a
crash never leaves a half-written key. Ciphertext layout (version 1)::

    0x01 | nonce (12 bytes) | AES-GCM ciphertext + tag

with the purpose of the secret (``b"vmware-credential"``, ``b"vma-secret"``) as associated data,
so a ciphertext cannot be moved from one column to another.

Password hashing (argon2) is CPU-bound (tens of ms): it runs in a worker thread under its own
capacity limiter so it never blocks the event loop.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import trio
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = b"\x01"
_NONCE_LEN = 12
KEY_LEN = 32

_hasher = PasswordHasher()
_hash_limiter = trio.CapacityLimiter(2)
# A valid hash of a random password: verifying against it costs what a real check costs, so an
# unknown user name takes as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class SecretBoxError(Exception):
    """A ciphertext could not be decrypted (wrong key file or tampered data)."""


def load_or_create_key(path: Path) -> bytes:
    """Read the key at ``path``, creating it (0600, atomically) when absent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(KEY_LEN))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process created it meanwhile: keep theirs
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        data = path.read_bytes()
    if len(data) != KEY_LEN:
        raise SecretBoxError(f"key file {path} must hold exactly {KEY_LEN} bytes")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SecretBoxError(f"key file {path} is readable by others (mode {mode:o}); chmod 600 it")
    return data


class SecretBox:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def encrypt(self, plaintext: str, purpose: bytes) -> bytes:
        nonce = os.urandom(_NONCE_LEN)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext.encode("utf-8"), purpose)

    def decrypt(self, blob: bytes, purpose: bytes) -> str:
        if len(blob) < 1 + _NONCE_LEN + 16 or blob[:1] != _VERSION:
            raise SecretBoxError("unknown ciphertext format")
        nonce, body = blob[1 : 1 + _NONCE_LEN], blob[1 + _NONCE_LEN :]
        try:
            return self._aead.decrypt(nonce, body, purpose).decode("utf-8")
        except Exception as exc:  # cryptography raises InvalidTag
            raise SecretBoxError("ciphertext does not decrypt with this key") from exc


async def hash_password(password: str) -> str:
    return await trio.to_thread.run_sync(_hasher.hash, password, limiter=_hash_limiter)


async def verify_password(password_hash: str | None, password: str) -> bool:
    def check() -> bool:
        try:
            return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    return await trio.to_thread.run_sync(check, limiter=_hash_limiter)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
