"""``vma-enroll`` against the real OMA: a rejected enrollment writes nothing and says why; an
approval not given in time ends with a clear error; without a tunnel on the OMA the configuration
names the OMA's URL and the secret is written 0600, merged into the existing configuration."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.oma.oma_harness import Oma, make_config, run_oma
from vma.enroll_cli import EnrollError, enroll, main


@pytest.fixture
async def real_oma(tmp_path: Path, oma_dsn: str) -> AsyncIterator[Oma]:
    config = make_config(
        tmp_path, oma_dsn, "http://127.0.0.1:9", vma_secret_file=tmp_path / "oma-side.secret"
    )
    async with run_oma(config) as oma:
        yield oma


async def decide(oma: Oma, verdict: str) -> None:
    with trio.fail_after(20):
        while not (pending := [e for e in (await oma.get("/admin/vma/pending")).json()["enrollments"]
                               if e["status"] == "awaiting_approval"]):  # fmt: skip
            await trio.sleep(0.05)
    r = await oma.post(f"/admin/vma/{verdict}/{pending[0]['id']}", json={"reason": "test"})
    assert r.status_code == 200, r.text


async def pairing_code(oma: Oma) -> str:
    return str((await oma.post("/admin/vma/pairing-code", json={})).json()["pairing_code"])


async def test_approved_without_a_tunnel_writes_the_secret_and_merges_the_config(
    real_oma: Oma, tmp_path: Path
) -> None:
    config = tmp_path / "vma.json"
    config.write_text(json.dumps({"source": "file", "port": 8081}))
    code = await pairing_code(real_oma)
    out = io.StringIO()
    async with trio.open_nursery() as n:
        n.start_soon(decide, real_oma, "approve")
        written = await enroll(real_oma.base_url, code, config_path=config, state_dir=tmp_path / "state",
                               name="vma-cli", approval_timeout=20, interval=0.05, out=out)  # fmt: skip
    on_disk = json.loads(config.read_text())
    assert on_disk == written and on_disk["source"] == "file" and on_disk["oma_url"] == real_oma.base_url
    assert on_disk["appliance_id"].startswith("vma-") and "tunnel_host" not in on_disk
    secret = Path(on_disk["oma_secret_file"])
    assert secret.stat().st_mode & 0o777 == 0o600 and config.stat().st_mode & 0o777 == 0o600
    assert "key fingerprint: SHA256:" in out.getvalue()
    # the OMA signs its requests to the VMA with the same secret: enrollment delivered it to both
    assert real_oma.config.vma_secret_file is not None
    assert real_oma.config.vma_secret_file.read_text() == secret.read_text()


async def test_rejected_writes_nothing(real_oma: Oma, tmp_path: Path) -> None:
    code = await pairing_code(real_oma)
    async with trio.open_nursery() as n:
        n.start_soon(decide, real_oma, "reject")
        with pytest.raises(EnrollError, match="enrollment rejected: test"):
            await enroll(real_oma.base_url, code, config_path=tmp_path / "vma.json", state_dir=tmp_path / "s",
                         name="vma-cli", approval_timeout=20, interval=0.05, out=io.StringIO())  # fmt: skip
    assert not (tmp_path / "vma.json").exists() and not (tmp_path / "s").exists()


async def test_no_approval_in_time_and_a_bad_code(real_oma: Oma, tmp_path: Path) -> None:
    code = await pairing_code(real_oma)
    with pytest.raises(EnrollError, match="not approved within 1 s"):
        await enroll(real_oma.base_url, code, config_path=tmp_path / "vma.json", state_dir=tmp_path / "s",
                     name="vma-cli", approval_timeout=1, interval=0.1, out=io.StringIO())  # fmt: skip
    status = await trio.to_thread.run_sync(
        main,
        [
            "--oma",
            real_oma.base_url,
            "--pairing-code",
            "AAAA-BBBB-CCCC",
            "--config",
            str(tmp_path / "c.json"),
        ],
    )
    assert status == 1
