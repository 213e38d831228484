"""A TLS certificate's thumbprint as operators and VMware tools write it, checked and normalised
the same way by the OMA (credentials) and the VMA (pinning vCenter)."""

from __future__ import annotations

import re

#: 20 (SHA-1) or 32 (SHA-256) bytes as hex, colon-separated or not.
_THUMBPRINT = re.compile(
    r"(?:[0-9A-Fa-f]{2}:){19}[0-9A-Fa-f]{2}(?:(?::[0-9A-Fa-f]{2}){12})?|[0-9A-Fa-f]{40}|[0-9A-Fa-f]{64}"
)


def normalize_thumbprint(value: str) -> str:
    """``value`` as upper-case colon-separated hex (``AB:CD:...``), as VMware tools show it:
    32 bytes (SHA-256) or 20 bytes (SHA-1), with or without colons. ValueError otherwise."""
    value = value.strip()
    if not _THUMBPRINT.fullmatch(value):
        raise ValueError(
            "tls_thumbprint must be the certificate's SHA-256 (or SHA-1) fingerprint as hex bytes,"
            " e.g. AB:CD:...:EF (32 or 20 bytes)"
        )
    digits = value.replace(":", "").upper()
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))
