"""``oma-admin`` against a real OMA: the console script in a subprocess, over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from tests.oma.oma_harness import ADMIN_PASSWORD, ADMIN_USER, Oma
from tests.oma.test_oma_enrollment import FakeVmaKeys, enroll

OMA_ADMIN = Path(sys.executable).with_name("oma-admin")


async def run(
    oma: Oma, *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[bytes]:
    assert OMA_ADMIN.exists(), f"{OMA_ADMIN} is missing: install the project (scripts/bootstrap.sh)"
    base = {k: v for k, v in os.environ.items() if not k.startswith("OMA_")}
    return await trio.run_process(
        [str(OMA_ADMIN), "--oma", oma.base_url, *args],
        env=base | (env or {}),
        stdin=stdin.encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return str(result.stdout.decode())


def as_json(result: subprocess.CompletedProcess[bytes]) -> Any:
    return json.loads(out(result))


async def token_file(oma: Oma, tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text(oma.token + "\n")
    return str(path)


async def enroll_a_vma(oma: Oma, code: str, name: str) -> str:
    """The VMA's side of enrollment (the seed's public calls), up to awaiting approval."""
    keys = FakeVmaKeys()
    e = await enroll(oma, keys, code, name)
    r = await oma.client.post(
        oma.url("/vma/enroll/verify"),
        json={"enrollment_id": e["enrollment_id"], "signature": keys.sign(e["challenge"])},
    )
    assert r.status_code == 200, r.text
    return str(e["enrollment_id"])


async def test_enrollment_from_the_command_line(oma: Oma, tmp_path: Path) -> None:
    tf = await token_file(oma, tmp_path)
    code_line = out(await run(oma, "--token-file", tf, "pairing-code", "create", "--ttl", "300"))
    code = code_line.split("\t")[0]
    assert code and "valid until" in code_line
    assert (
        out(await run(oma, "--token-file", tf, "enrollments", "pending")).strip() == "no pending enrollments"
    )

    first = await enroll_a_vma(oma, code, "vma-east")
    pending = out(await run(oma, "--token-file", tf, "enrollments", "pending"))
    assert first in pending and "vma-east" in pending and "SHA256:abc" in pending
    approved = as_json(await run(oma, "--token-file", tf, "--json", "enrollments", "approve", first))
    assert approved["status"] == "approved" and approved["appliance_id"]
    assert first in out(await run(oma, "--token-file", tf, "enrollments", "active"))

    second_code = as_json(await run(oma, "--token-file", tf, "--json", "pairing-code", "create"))[
        "pairing_code"
    ]
    second = await enroll_a_vma(oma, second_code, "vma-west")
    rejected = out(
        await run(oma, "--token-file", tf, "enrollments", "reject", second, "--reason", "unknown host")
    )
    assert rejected.strip() == f"{second}\trejected"

    revoked = out(await run(oma, "--token-file", tf, "enrollments", "revoke", first))
    assert revoked.strip() == f"{first}\trevoked"
    audit = as_json(await run(oma, "--token-file", tf, "--json", "audit", "--vma", "--enrollment", first))
    events = {e["event_type"] for e in audit["events"]}
    assert {"approved", "revoked"} <= events or len(events) >= 2, events

    # the API's own refusal, its message and a non-zero exit
    again = await run(oma, "--token-file", tf, "enrollments", "approve", first)
    assert again.returncode == 1 and again.stderr.decode().startswith("oma-admin: ")
    assert "(" in again.stderr.decode() and again.stdout == b""


async def test_users_from_the_command_line(oma: Oma, tmp_path: Path) -> None:
    login = {"OMA_USER": ADMIN_USER, "OMA_PASSWORD": ADMIN_PASSWORD}
    created = out(
        await run(
            oma,
            "users",
            "create",
            "carol",
            "--role",
            "operator",
            env=login | {"OMA_NEW_PASSWORD": "carol-pass-1"},
        )
    )
    assert "\tcarol\toperator\tTrue" in created
    assert await oma.login("carol", "carol-pass-1")

    listing = out(await run(oma, "--user", ADMIN_USER, "users", "list", env={"OMA_PASSWORD": ADMIN_PASSWORD}))
    assert [line.split("\t")[1] for line in listing.splitlines()] == [ADMIN_USER, "carol"]

    changed = as_json(await run(oma, "--json", "users", "set-role", "carol", "viewer", env=login))
    assert changed["role"] == "viewer"
    # the new password on stdin
    reset = out(await run(oma, "users", "reset-password", "carol", env=login, stdin="carol-pass-2\n"))
    assert reset.startswith("password of carol reset")
    assert await oma.login("carol", "carol-pass-2")
    assert "\tcarol\tviewer\tFalse" in out(await run(oma, "users", "disable", "carol", env=login))

    audit = out(await run(oma, "audit", "--actor", ADMIN_USER, env=login))
    assert "user_created" in audit or "created" in audit, audit

    deleted = out(await run(oma, "users", "delete", "carol", env=login))
    assert deleted.startswith("user carol deleted")
    missing = await run(oma, "users", "delete", "carol", env=login)
    assert missing.returncode == 1 and b"no user named 'carol'" in missing.stderr


async def test_errors_exit_non_zero_with_the_apis_message(oma: Oma, tmp_path: Path) -> None:
    bad_login = await run(
        oma, "users", "list", env={"OMA_USER": ADMIN_USER, "OMA_PASSWORD": "wrong-password"}
    )
    assert bad_login.returncode == 1
    message = bad_login.stderr.decode()
    assert message.startswith("oma-admin: ") and "UNAUTHORIZED" in message, message

    bogus = tmp_path / "token"
    bogus.write_text("not-a-token")
    refused = await run(oma, "--token-file", str(bogus), "users", "list")
    assert refused.returncode == 1 and b"invalid, expired or revoked token (UNAUTHORIZED)" in refused.stderr

    weak = await run(
        oma, "users", "create", "dave", env={"OMA_USER": ADMIN_USER, "OMA_PASSWORD": ADMIN_PASSWORD,
                                             "OMA_NEW_PASSWORD": "short"},
    )  # fmt: skip
    assert weak.returncode == 1 and b"at least 8 characters (VALIDATION_FAILED)" in weak.stderr

    nobody = await run(oma, "users", "list")
    assert nobody.returncode == 1 and b"no credentials" in nobody.stderr

    unreachable = await trio.run_process(
        [str(OMA_ADMIN), "--oma", "http://127.0.0.1:9", "--token-file", str(bogus), "users", "list"],
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    assert unreachable.returncode == 2 and b"cannot reach the OMA" in unreachable.stderr
