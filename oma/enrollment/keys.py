"""A VMA's ed25519 SSH public key, and the signatures of its challenge made with it."""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from pyapp.api import ApiError


def check_public_key(public_key: str) -> None:
    """422 unless ``public_key`` is an OpenSSH ed25519 public key."""
    try:
        key = load_ssh_public_key(public_key.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise ApiError.unprocessable("vma_public_key is not an OpenSSH public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ApiError.unprocessable("vma_public_key must be an ed25519 key")


def signature_verifies(public_key: str, challenge: str, signature_b64: str) -> bool:
    try:
        key = load_ssh_public_key(public_key.encode("ascii"))
        signature = base64.b64decode(signature_b64, validate=True)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        return False
    if not isinstance(key, Ed25519PublicKey):
        return False
    try:
        key.verify(signature, challenge.encode("ascii"))
    except InvalidSignature:
        return False
    return True
