"""``vma-enroll --oma URL --pairing-code CODE``: enroll this VMA with an OMA (docs/tunnel.md).

1. make this VMA's ed25519 key (the private half never leaves this machine);
2. ``POST /vma/enroll`` with the pairing code, the public key, the name, version and the key's
   fingerprint; sign the challenge and ``POST /vma/enroll/verify``;
3. print the fingerprint the administrator must compare with ``GET /admin/vma/pending`` before
   approving, then poll ``GET /vma/enroll/result`` (a dot per poll) until approved, rejected or
   ``--timeout``;
4. once approved, write the key (0600), the OMA's pinned host key (known_hosts), the secret (0600)
   and the VMA's configuration (0600, merged into an existing file): each a new file, fsynced,
   renamed over the old one.

Exit status: 0 enrolled; 1 rejected, timed out or refused; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pyapp.atomic_file import write_atomic
from vma.tunnel.ssh import ssh_fingerprint


class EnrollError(Exception):
    """The enrollment did not complete; the message is for the operator."""


def _version() -> str:
    try:
        return version("vmware-cloudstack-mover")
    except PackageNotFoundError:
        return "0.0.0"


def known_hosts_line(host: str, port: int, host_key: str) -> str:
    pattern = host if port == 22 else f"[{host}]:{port}"
    return f"{pattern} {host_key}\n"


async def _call(http: httpx.AsyncClient, method: str, url: str, **kw: Any) -> dict[str, Any]:
    try:
        r = await http.request(method, url, **kw)
    except httpx.HTTPError as e:
        raise EnrollError(f"cannot reach the OMA at {url}: {e}") from e
    try:
        body: dict[str, Any] = r.json()
    except ValueError:
        body = {}
    if r.status_code >= 400:
        message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else None
        raise EnrollError(
            f"the OMA answered {r.status_code}: {message or body.get('message') or r.text[:200]}"
        )
    return body


async def enroll(
    oma: str,
    pairing_code: str,
    *,
    config_path: Path,
    state_dir: Path,
    name: str,
    approval_timeout: float = 1800.0,
    interval: float = 5.0,
    local_address: str = "127.0.0.1",
    verify: bool | str = True,
    out: TextIO = sys.stdout,
) -> dict[str, Any]:
    """Enroll; returns the configuration written."""
    base = oma.rstrip("/")
    api = f"{base}/api/v1"
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    fingerprint = ssh_fingerprint(public.decode())
    async with httpx.AsyncClient(timeout=30.0, verify=verify) as http:
        started = await _call(
            http,
            "POST",
            f"{api}/vma/enroll",
            json={
                "pairing_code": pairing_code,
                "vma_public_key": public.decode(),
                "vma_name": name,
                "vma_version": _version(),
                "vma_fingerprint": fingerprint,
            },
        )
        enrollment_id = str(started["enrollment_id"])
        signature = base64.b64encode(key.sign(str(started["challenge"]).encode())).decode()
        await _call(
            http,
            "POST",
            f"{api}/vma/enroll/verify",
            json={"enrollment_id": enrollment_id, "signature": signature},
        )
        print(f"enrollment {enrollment_id} of {name!r} awaits approval on {base}", file=out)
        print(f"key fingerprint: {fingerprint}", file=out)
        print("the administrator approves it only if the OMA shows this same fingerprint", file=out)
        result: dict[str, Any] = {}
        with trio.move_on_after(approval_timeout) as waited:
            while True:
                result = await _call(
                    http,
                    "GET",
                    f"{api}/vma/enroll/result",
                    params={"enrollment_id": enrollment_id, "signature": signature},
                )
                if result["status"] in ("approved", "rejected", "revoked"):
                    break
                print(".", end="", file=out, flush=True)
                await trio.sleep(interval)
        print(file=out)
    if waited.cancelled_caught:
        raise EnrollError(f"not approved within {approval_timeout:.0f} s (enrollment {enrollment_id})")
    if result["status"] != "approved":
        reason = result.get("reason")
        raise EnrollError(f"enrollment {result['status']}" + (f": {reason}" if reason else ""))
    if not result.get("secret"):
        raise EnrollError(str(result.get("message") or "the OMA delivered no secret"))
    written = _write(result, key, base, config_path, state_dir, local_address)
    print(f"approved as {result['appliance_id']}; configuration written to {config_path}", file=out)
    return written


def _write(
    result: dict[str, Any],
    key: Ed25519PrivateKey,
    oma: str,
    config_path: Path,
    state_dir: Path,
    local_address: str,
) -> dict[str, Any]:
    key_file, secret_file = state_dir / "tunnel_ed25519", state_dir / "oma.secret"
    config: dict[str, Any] = {}
    if config_path.exists():
        config = json.loads(config_path.read_text())
    config.update(appliance_id=result["appliance_id"], oma_secret_file=str(secret_file), oma_url=oma)
    tunnel = result.get("tunnel")
    if tunnel:
        host = tunnel.get("ssh_host") or urlsplit(oma).hostname or ""
        known_hosts = state_dir / "known_hosts"
        write_atomic(
            key_file,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        write_atomic(
            key_file.with_suffix(".pub"),
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            + b"\n",
            0o644,
        )
        write_atomic(
            known_hosts, known_hosts_line(host, int(tunnel["ssh_port"]), tunnel["host_key"]).encode()
        )
        config.update(
            oma_url=f"http://{local_address}:{tunnel['oma_api_port']}",
            tunnel_host=host,
            tunnel_port=int(tunnel["ssh_port"]),
            tunnel_user=tunnel["user"],
            tunnel_key_file=str(key_file),
            tunnel_known_hosts=str(known_hosts),
            tunnel_remote_port=int(tunnel["vma_listen_port"]),
            tunnel_forward_ports=[int(p) for p in tunnel["open_ports"]],
            tunnel_local_address=local_address,
        )
    write_atomic(secret_file, f"{result['secret']}\n".encode())
    write_atomic(config_path, (json.dumps(config, indent=2) + "\n").encode())
    return config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vma-enroll", description="Enroll this VMA with an OMA.")
    p.add_argument("--oma", required=True, help="the OMA's URL, e.g. https://oma.example:443")
    p.add_argument("--pairing-code", required=True, help="the code an OMA administrator created")
    p.add_argument("--config", type=Path, default=Path("/etc/vma/vma.json"), help="the VMA configuration")
    p.add_argument("--state-dir", type=Path, default=Path("/etc/vma"), help="key, secret, known_hosts")
    p.add_argument("--name", default=socket.gethostname(), help="this VMA's name (default: host name)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for approval")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between two polls")
    p.add_argument("--local-address", default="127.0.0.1", help="where the tunnel's forwards listen here")
    p.add_argument("--ca-file", help="CA certificates (PEM) that verify the OMA's HTTPS certificate")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        trio.run(
            lambda: enroll(
                args.oma,
                args.pairing_code,
                config_path=args.config,
                state_dir=args.state_dir,
                name=args.name,
                approval_timeout=args.timeout,
                interval=args.interval,
                local_address=args.local_address,
                verify=args.ca_file or True,
            )
        )
    except EnrollError as e:
        print(f"vma-enroll: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
