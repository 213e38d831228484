from __future__ import annotations

from oma_harness import Oma


async def test_health_and_login(oma: Oma) -> None:
    r = await oma.client.get(oma.url("/health"))
    assert r.status_code == 200
    assert r.json()["status"] == "healthy"
    r = await oma.get("/vms")
    assert r.status_code == 200
