"""The OMA client against the OMA double over real HTTP: login, renewal, 401 retry, backoff."""

from __future__ import annotations

import pytest
import trio

from tests.vma.oma_double import OmaDouble, run_oma_double
from vma.oma_client.client import OmaAuthError, OmaClient, OmaError, OmaUnreachable


def client(
    double: OmaDouble, *, renew_margin: float = 300.0, unreachable_deadline: float = 10.0
) -> OmaClient:
    return OmaClient(
        double.url,
        double.appliance_id,
        double.secret,
        renew_margin=renew_margin,
        backoff_initial=0.05,
        backoff_max=0.4,
        unreachable_deadline=unreachable_deadline,
    )


async def test_login_once_then_reuse_the_token() -> None:
    async with run_oma_double() as oma:
        c = client(oma)
        assert await c.previous_change_id("/DC0/vm/vm1", "disk-2000") is None
        await c.store_change_id("job-1", "/DC0/vm/vm1", "disk-2000", "52 aa/3")
        assert await c.previous_change_id("/DC0/vm/vm1", "disk-2000") == "52 aa/3"
        await c.update_replication("job-1", status="replicating", progress_percent=12.5)
        await c.submit_inventory("vc", "DC0", [{"id": "vm-1", "name": "vm1", "path": "/DC0/vm/vm1"}])
        assert oma.logins == 1 and c.logins == 1
        assert oma.replications["job-1"]["progress_percent"] == 12.5
        assert oma.inventory[0]["vcenter"] == {"host": "vc", "datacenter": "DC0"}
        await c.aclose()


async def test_proactive_renewal_before_expiry() -> None:
    # Tokens live 2 s; renewing 1.5 s before expiry means a new login after 0.5 s.
    async with run_oma_double(OmaDouble(ttl=2.0)) as oma:
        c = client(oma, renew_margin=1.5)
        await c.previous_change_id("/p", "disk-1")
        await c.previous_change_id("/p", "disk-1")
        assert oma.logins == 1
        await trio.sleep(0.6)
        await c.previous_change_id("/p", "disk-1")
        assert oma.logins == 2
        # no 401 was ever needed
        assert all(status != 401 for _, _, status in oma.requests)
        await c.aclose()


async def test_one_retry_after_401() -> None:
    async with run_oma_double() as oma:
        c = client(oma)
        await c.previous_change_id("/p", "disk-1")
        oma.revoke_all()  # the OMA forgot the token (restart, revocation)
        assert await c.previous_change_id("/p", "disk-1") is None
        assert oma.logins == 2
        statuses = [s for m, p, s in oma.requests if p.endswith("/changeid")]
        assert statuses == [200, 401, 200]
        # Two 401 in a row: one retry only, then an error (no loop).
        oma.fail_next_401 = 2
        with pytest.raises(OmaError) as info:
            await c.previous_change_id("/p", "disk-1")
        assert info.value.status == 401
        assert oma.logins == 3
        await c.aclose()


async def test_wrong_secret_is_an_auth_error() -> None:
    async with run_oma_double() as oma:
        c = OmaClient(oma.url, oma.appliance_id, "wrong", backoff_initial=0.05)
        with pytest.raises(OmaAuthError):
            await c.previous_change_id("/p", "disk-1")
        await c.aclose()


async def test_backoff_while_the_oma_is_down(nursery: trio.Nursery) -> None:
    oma = OmaDouble()
    await nursery.start(oma.serve)
    c = client(oma)
    await c.previous_change_id("/p", "disk-1")
    await oma.stop()
    result: list[str | None] = []

    async def call() -> None:
        result.append(await c.previous_change_id("/p", "disk-1"))

    started = trio.current_time()
    async with trio.open_nursery() as inner:
        inner.start_soon(call)
        await trio.sleep(1.0)  # several refused attempts, backing off
        assert not result
        await nursery.start(oma.serve)  # the OMA is back on the same port
    assert result == [None]
    assert trio.current_time() - started >= 1.0
    await c.aclose()


async def test_unreachable_deadline() -> None:
    oma = OmaDouble()  # never started: the port refuses
    c = client(oma, unreachable_deadline=0.5)
    with trio.fail_after(10), pytest.raises(OmaUnreachable):
        await c.previous_change_id("/p", "disk-1")
    await c.aclose()
