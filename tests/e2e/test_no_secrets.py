"""No secret ever leaves the services: a full run of the real OMA, the real VMA and the vSphere lab
(logins, users, vCenter credentials, a replication, a backup, the VMA's enrollment, a CIFS
repository with a password, failed logins, requests refused by validation), with every log record
of both services (the JSON lines they write, DEBUG and up) and every API answer (the test's own
requests to the OMA and every answer the VMA gives the OMA) searched for every secret the run set
and for their obvious encodings (base64, URL encoding, JSON escaping, hex for raw key bytes).

A secret may be issued once by design: the login answer carries its token, the enrollment result
its secret. Those answers are not searched for that one secret; nothing else may carry it."""

from __future__ import annotations

import base64
import io
import json
import secrets
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from lab import DiskSpec, Lab, LabVM, MiB, Partition
from oma.state import STATE_KEY, OmaState
from tests.e2e.conftest import Product, enroll
from tests.oma.oma_harness import ADMIN_PASSWORD, ADMIN_USER

pytestmark = pytest.mark.e2e

TERMINAL = ("completed", "failed", "cancelled")


def secret(label: str) -> str:
    """A secret nothing else can contain by chance, with characters every encoding changes."""
    return f"{label}/{secrets.token_urlsafe(12)}+&=%"


# The vCenter password is a secret of the run: a lab of our own with a password no other text has
# ("pass", the shared lab's, is in every "password").
LAB_PASSWORD = secret("vc")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab(tmp_path / "lab", qcda_window=8 * MiB, password=LAB_PASSWORD) as lab:
        yield lab


def encodings(value: str | bytes) -> set[str]:
    raw = value.encode() if isinstance(value, str) else value
    forms = {
        base64.b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        urllib.parse.quote(raw, safe=""),
        urllib.parse.quote_plus(raw),
    }
    if isinstance(value, str):
        forms |= {value, json.dumps(value)[1:-1]}
    else:
        forms |= {raw.hex(), raw.hex().upper()}
    return {f for f in forms if len(f) >= 8}


@dataclass
class Answers:
    """Every HTTP answer seen, as ``(request line, status, headers + body)``."""

    items: list[tuple[str, int, str]] = field(default_factory=list)

    async def hook(self, response: httpx.Response) -> None:
        await response.aread()
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        request = f"{response.request.method} {response.request.url}"
        self.items.append((request, response.status_code, f"{headers}\n\n{response.text}"))


def small_vm(lab: Lab) -> LabVM:
    return lab.create_vm(
        "vm1",
        [DiskSpec(16 * MiB, [Partition(8 * MiB, "ext4", "root", {"etc/hostname": b"vm1\n"})])],
        guest_id="ubuntu64Guest",
    )


async def test_no_secret_in_logs_or_answers(
    product: Product, log_capture: io.StringIO, tmp_path: Path
) -> None:
    oma = product.oma
    st: OmaState = oma.extra["app"].extensions[STATE_KEY]
    answers = Answers()
    oma.client.event_hooks["response"].append(answers.hook)
    assert st.vma_ is not None
    st.vma_._http.event_hooks["response"].append(answers.hook)  # every answer of the VMA
    vm = await trio.to_thread.run_sync(small_vm, product.lab)

    # secret -> the answers allowed to carry it (the one that issued it)
    allowed: dict[str, tuple[str, ...]] = {}

    def keep(value: str, *issued_by: str) -> str:
        allowed[value] = issued_by
        return value

    keep(ADMIN_PASSWORD)
    keep(oma.token, "/auth/login")
    keep(LAB_PASSWORD)
    assert product.vma.oma_secret_file is not None
    keep(product.vma.oma_secret_file.read_text().strip(), "/vma/enroll/result")
    key_bytes = st.config.key_file.read_bytes()  # the credential file: the secret box's key

    # logins: the administrator again, a wrong password, an unknown user
    admin_token = keep(await oma.login(), "/auth/login")
    wrong = keep(secret("wrong"))
    r = await oma.client.post(oma.url("/auth/login"), json={"username": ADMIN_USER, "password": wrong})
    assert r.status_code == 401, r.text
    r = await oma.client.post(oma.url("/auth/login"), json={"username": "nobody", "password": wrong})
    assert r.status_code == 401, r.text
    bad_bearer = keep(secret("bearer"))
    r = await oma.client.get(oma.url("/vms"), headers={"Authorization": f"Bearer {bad_bearer}"})
    assert r.status_code == 401, r.text

    # a user: created, logs in, changes the password; a password refused by validation
    user_password = keep(secret("user"))
    r = await oma.post("/users", json={"username": "op1", "password": user_password, "role": "operator"})
    assert r.status_code == 201, r.text
    user_token = keep(await oma.login("op1", user_password), "/auth/login")
    new_password = keep(secret("newpw"))
    r = await oma.client.post(
        oma.url("/auth/password"),
        json={"current_password": user_password, "new_password": new_password},
        headers={"Authorization": f"Bearer {user_token}"},
    )
    assert r.status_code == 200, r.text
    short = keep(secrets.token_hex(3))  # 6 characters: under the minimum
    r = await oma.post("/users", json={"username": "op2", "password": short, "role": "viewer"})
    assert r.status_code in (400, 422), r.text
    r = await oma.post("/users", json={"username": "op3", "password": 12345678901234567})
    assert r.status_code in (400, 422), r.text
    keep("12345678901234567")

    # vCenter credentials: another one with a wrong password, tested (vCenter refuses it)
    vc_wrong = keep(secret("vcwrong"))
    r = await oma.post(
        "/vmware-credentials",
        json={
            "credential_name": "wrong",
            "vcenter_host": product.lab.url,
            "username": product.lab.username,
            "password": vc_wrong,
            "datacenter": "DC0",
        },
    )
    assert r.status_code == 201, r.text
    cred_id = r.json()["id"]
    r = await oma.post(f"/vmware-credentials/{cred_id}/test", json={})
    assert r.status_code < 500, r.text
    # a replication and a backup with the credential vCenter refuses: they fail, saying why
    r = await oma.post("/discovery/add-vms", json={"vm_names": ["vm1"]})
    assert r.status_code == 200, r.text
    refused = await product.replicate(vm, credential_id=cred_id)
    ended = await product.wait(refused["id"])
    assert ended["status"] == "failed", ended
    # bodies the API cannot read, carrying a password: malformed JSON, a form, a wrong type
    for content, kind in (
        (f'{{"username": "admin", "password": "{wrong}"', "application/json"),
        (
            urllib.parse.urlencode({"username": "admin", "password": wrong}),
            "application/x-www-form-urlencoded",
        ),
        (json.dumps({"username": "admin", "password": wrong}), "text/plain"),
    ):
        r = await oma.client.post(oma.url("/auth/login"), content=content, headers={"Content-Type": kind})
        assert 400 <= r.status_code < 500, r.text
        r = await oma.client.post(
            oma.url("/vmware-credentials"), content=content, headers={**oma.auth, "Content-Type": kind}
        )
        assert 400 <= r.status_code < 500, r.text
    r = await oma.put(f"/vmware-credentials/{cred_id}", json={"password": keep(secret("vcnew"))})
    assert r.status_code == 200, r.text
    for path in ("/vmware-credentials", f"/vmware-credentials/{cred_id}", "/vmware-credentials/default"):
        assert (await oma.get(path)).status_code == 200

    # a second VMA enrolls: its secret is issued once, by the enrollment result
    _, second_secret = await enroll(oma, "vma-second")
    keep(second_secret, "/vma/enroll/result")

    # a replication and a backup of the VM
    job = await product.replicate(vm)
    done = await product.wait(job["id"])
    assert done["status"] == "completed", done["error_message"]
    r = await oma.post(
        "/repositories",
        json={"name": "local", "type": "local", "config": {"disk_path": str(tmp_path / "repo")}},
    )
    assert r.status_code == 201, r.text
    r = await oma.post(
        "/backup/start",
        json={"vm_name": "vm1", "disk_id": "0", "backup_type": "full", "repository_id": r.json()["id"]},
    )
    assert r.status_code == 202, r.text
    engine = st.backup_engine
    assert engine is not None
    with trio.fail_after(60):
        while True:
            point = (await oma.get(f"/backup/{r.json()['backup_id']}")).json()
            if point["status"] in TERMINAL and point["backup_id"] not in engine.backups:
                break
            await trio.sleep(0.05)
    assert point["status"] == "completed", point["error_message"]

    # CIFS repositories with a password: a test and a create (no server answers), one refused
    cifs_password = keep(secret("cifs"))
    cifs = {
        "server": "127.0.0.1",
        "share_name": "share",
        "username": "backup",
        "password": cifs_password,
        "mount_point": str(tmp_path / "cifs"),
    }
    r = await oma.post("/repositories/test", json={"type": "cifs", "config": cifs})
    assert r.status_code < 500, r.text
    r = await oma.post(
        "/repositories", json={"name": f"cifs-{uuid.uuid4().hex[:6]}", "type": "cifs", "config": cifs}
    )
    assert r.status_code < 500, r.text
    r = await oma.post(
        "/repositories",
        json={"name": "bad", "type": "cifs", "config": {**cifs, "mount_options": "password=x"}},
    )
    assert 400 <= r.status_code < 500, r.text
    r = await oma.get("/repositories")
    assert r.status_code == 200, r.text

    # what an administrator can read back
    for path in (
        "/users",
        "/users/audit",
        "/auth/tokens",
        "/admin/vma/active",
        "/admin/vma/audit",
        "/debug/health",
        "/debug/logs?limit=1000",
        "/replications",
        f"/replications/{job['id']}",
    ):
        r = await oma.get(path)
        assert r.status_code == 200, (path, r.text)
    r = await oma.post("/auth/logout", json={}, headers={"Authorization": f"Bearer {admin_token}"})
    assert r.status_code == 200, r.text

    # -- the search ------------------------------------------------------------------------------
    logs = log_capture.getvalue()
    records = [json.loads(line) for line in logs.splitlines() if line.strip()]
    assert any(rec["message"] == "replication job created" for rec in records)  # the capture works
    leaks: list[str] = []
    for value, issued_by in allowed.items():
        for form in encodings(value):
            if form in logs:
                line = next(ln for ln in logs.splitlines() if form in ln)
                leaks.append(f"log carries {value!r} (as {form!r}): {line[:400]}")
            for request, _status, text in answers.items:
                if form in text and not any(request.split("?")[0].endswith(p) for p in issued_by):
                    leaks.append(f"answer to {request} carries {value!r}: {text[-400:]}")
    for form in encodings(key_bytes):
        if form in logs or any(form in text for _, _, text in answers.items):
            leaks.append(f"the key file's contents appear (as {form!r})")
    assert not leaks, "\n".join(leaks)
