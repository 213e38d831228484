# pyVim's helpers are unannotated:
# mypy: disable-error-code="no-untyped-call"
"""vSphere through pyvmomi against the lab: discovery over the API, CBT activation, the
QueryChangedDiskAreas loop (its guard against a zero-length answer is pure logic: the lab never
gives one, so a fake answer object drives it)."""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from pyVim.connect import Disconnect
from pyVim.task import WaitForTask

from lab import Lab, LabVM
from tests.vma.conftest import Vma
from vma.replication.jobs import Job, Journal
from vma.vsphere.client import (
    DEADLINES,
    ChangedAreasError,
    VCenterLogin,
    VSphere,
    VSphereError,
    cbt_epoch,
    collect_changed_areas,
    configure_deadlines,
    configure_tls,
    merge_extents,
    normalize_thumbprint,
    run,
    same_cbt_epoch,
)


async def test_discover_lab_vms(vma: Vma, lab: Lab, vm1: LabVM) -> None:
    await trio.to_thread.run_sync(lambda: lab.create_vm("db1", [], memory_mb=512))
    body = {"vcenter": lab.url, "username": lab.username, "password": lab.password, "datacenter": "DC0"}
    r = await vma.post("/api/v1/discover", {**body, "filter": "VM1"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["vcenter"] == {"host": lab.url, "datacenter": "DC0"}
    assert [v["name"] for v in answer["vms"]] == ["vm1"]
    vm = answer["vms"][0]
    assert vm["id"] == vm1.moref
    assert vm["path"] == "/DC0/vm/vm1"
    assert vm["power_state"] == "poweredOn"
    assert vm["guest_os"] == "ubuntu64Guest"
    assert (vm["memory_mb"], vm["num_cpu"]) == (2048, 2)
    assert [(d["id"], d["key"], d["capacity_bytes"], d["path"]) for d in vm["disks"]] == [
        (f"disk-{d.key}", d.key, d.capacity, d.file_name) for d in vm1.disks
    ]
    assert all(d["cbt_enabled"] is False for d in vm["disks"])
    assert [n["network"] for n in vm["networks"]] == ["VM Network"]
    every = (await vma.post("/api/v1/discover", body)).json()["vms"]
    assert {"vm1", "db1"} <= {v["name"] for v in every}


async def test_discover_errors(vma: Vma, lab: Lab) -> None:
    body = {"vcenter": lab.url, "username": lab.username, "password": "wrong", "datacenter": "DC0"}
    r = await vma.post("/api/v1/discover", body)
    assert r.status_code == 502 and r.json()["code"] == "OPERATION_FAILED"
    assert "refused the login" in r.json()["error"]
    r = await vma.post("/api/v1/discover", {**body, "password": lab.password, "datacenter": "NoSuchDC"})
    assert r.status_code == 502 and r.json()["code"] == "OPERATION_FAILED"


def test_ensure_cbt_sets_ctk_and_stuns(lab: Lab, vm1: LabVM) -> None:
    vs = VSphere.connect(VCenterLogin(lab.url, lab.username, lab.password))
    try:
        vm = vs.find_vm("/DC0/vm/vm1")
        assert all(d.change_id is None for d in vs.live_disks(vm))
        assert vs.ensure_cbt(vm, stun_name="vma-test-cbt-stun") is True
        disks = vs.live_disks(vm)
        assert all(d.cbt_enabled and d.change_id for d in disks)
        extra = {o.key: o.value for o in vm.config.extraConfig}
        assert all(extra.get(d.ctk_key) == "TRUE" for d in disks)
        assert [d.ctk_key for d in disks] == ["scsi0:0.ctkEnabled", "scsi0:1.ctkEnabled"]
        assert vs.snapshot_tree(vm) == []  # the stun snapshot is gone
        assert vs.ensure_cbt(vm, stun_name="vma-test-cbt-stun") is False  # already on: nothing to do
    finally:
        vs.disconnect()


# -- pure logic --------------------------------------------------------------------------------------


@dataclass
class Area:
    start: int
    length: int


@dataclass
class Answer:
    startOffset: int
    length: int
    changedArea: list[Area] = field(default_factory=list)


def test_loop_covers_the_disk_over_partial_answers() -> None:
    asked: list[int] = []
    window = 1000

    def query(offset: int) -> Answer:
        asked.append(offset)
        areas = [Area(offset + 10, 20)] if offset < 3000 else []
        return Answer(offset, min(window, 3500 - offset), areas)

    assert collect_changed_areas(query, 3500) == [(10, 20), (1010, 20), (2010, 20)]
    assert asked == [0, 1000, 2000, 3000]


def test_zero_length_answer_is_an_error_not_a_loop() -> None:
    calls = 0

    def query(offset: int) -> Answer:
        nonlocal calls
        calls += 1
        return Answer(offset, 0 if offset >= 1000 else 1000)

    with pytest.raises(ChangedAreasError, match="length 0"):
        collect_changed_areas(query, 4000)
    assert calls == 2


def test_answer_for_another_offset_or_outside_area_is_an_error() -> None:
    with pytest.raises(ChangedAreasError, match="asked for 0"):
        collect_changed_areas(lambda o: Answer(o + 512, 1000), 4000)
    with pytest.raises(ChangedAreasError, match="outside"):
        collect_changed_areas(lambda o: Answer(o, 1000, [Area(o + 900, 200)]), 4000)


def test_change_id_epochs() -> None:
    a = "52 de c0 d9 98 a8 ac 5b-a1 16 ed 5d 02 86 e1 04/17"
    b = "52 de c0 d9 98 a8 ac 5b-a1 16 ed 5d 02 86 e1 04/42"
    c = "52 11 22 33 44 55 66 77-88 99 aa bb cc dd ee ff/3"
    assert cbt_epoch(a) == "52 de c0 d9 98 a8 ac 5b-a1 16 ed 5d 02 86 e1 04"
    assert same_cbt_epoch(a, b)
    assert not same_cbt_epoch(a, c)  # CBT was reset: a full pass is due
    assert not same_cbt_epoch(a, None)
    assert not same_cbt_epoch("*", b)


def test_merge_extents() -> None:
    assert merge_extents([(10, 5), (0, 10), (30, 0), (20, 5), (22, 10)]) == [(0, 15), (20, 12)]


def test_vcenter_endpoint_forms() -> None:
    assert VCenterLogin("vc.example.com", "u", "p").endpoint() == ("https", "vc.example.com", 443)
    assert VCenterLogin("vc.example.com:8443", "u", "p").endpoint() == ("https", "vc.example.com", 8443)
    assert VCenterLogin("http://127.0.0.1:8989/sdk", "u", "p").endpoint() == ("http", "127.0.0.1", 8989)
    assert "secret-pass" not in repr(VCenterLogin("vc", "u", "secret-pass"))


def test_vm_in_a_folder_has_its_folder_path(lab: Lab, vm1: LabVM) -> None:
    vs = VSphere.connect(VCenterLogin(lab.url, lab.username, lab.password))
    try:
        dc = next(d for d in vs.datacenters() if d.name == "DC0")
        folder = dc.vmFolder.CreateFolder("prod")
        WaitForTask(folder.MoveIntoFolder_Task([vs.find_vm("/DC0/vm/vm1")]))
        found = vs.discover("DC0", "vm1")
        assert [v["path"] for v in found] == ["/DC0/vm/prod/vm1"]
        assert vs.find_vm("/DC0/vm/prod/vm1")._moId == vm1.moref
        with pytest.raises(VSphereError, match="no VM"):
            vs.find_vm("/DC0/vm/vm1")
    finally:
        vs.disconnect()


@pytest.fixture
def silent_vcenter() -> Iterator[str]:
    """A TCP listener that accepts connections (the kernel does) and never answers: a vCenter
    that stopped answering. Its URL."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/sdk"


@pytest.fixture
def short_deadlines() -> Iterator[None]:
    saved = (DEADLINES.call, DEADLINES.task)
    configure_deadlines(1.0, 2.0)
    yield
    configure_deadlines(*saved)


async def test_a_silent_vcenter_fails_the_call_within_its_deadline(
    silent_vcenter: str, short_deadlines: None
) -> None:
    start = trio.current_time()
    with trio.fail_after(15), pytest.raises(VSphereError, match="vCenter"):
        await run(VSphere.connect, VCenterLogin(silent_vcenter, "u", "p"))
    assert trio.current_time() - start < DEADLINES.call + 2.0


async def test_a_vcenter_stopped_mid_session_fails_the_call_within_its_deadline(
    lab: Lab, vm1: LabVM, short_deadlines: None
) -> None:
    """The lab stopped with SIGSTOP after the session was open: the snapshot call fails within
    its deadline (call + task seconds), not never."""
    vs = await run(VSphere.connect, VCenterLogin(lab.url, lab.username, lab.password))
    vm = await run(vs.find_vm, "/DC0/vm/vm1")
    assert lab._proc is not None  # the vcsim process (the Lab has no public handle on it)
    pid = lab._proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        start = trio.current_time()
        with trio.fail_after(20), pytest.raises(VSphereError, match="within"):
            await run(vs.create_snapshot, vm, "vma-deadline", "never ends")
        assert trio.current_time() - start < DEADLINES.call + DEADLINES.task + 2.0
    finally:
        os.kill(pid, signal.SIGCONT)
    await run(vs.disconnect)


# -- vCenter TLS (against the lab serving HTTPS with its self-signed certificate) -------------------


def _session_count(lab: Lab) -> int:
    si = lab.connect()
    try:
        return len(si.content.sessionManager.sessionList)
    finally:
        Disconnect(si)


def test_verify_is_the_default_and_refuses_a_self_signed_certificate(tls_lab: Lab) -> None:
    login = VCenterLogin(tls_lab.url, tls_lab.username, tls_lab.password)
    assert login.tls_mode == "verify"
    with pytest.raises(VSphereError, match="TLS certificate verification failed") as e:
        VSphere.connect(login)
    assert "self-signed" in str(e.value) or "self signed" in str(e.value)


def test_a_wrong_thumbprint_refuses_the_connection_before_login(tls_lab: Lab) -> None:
    before = _session_count(tls_lab)
    wrong = ":".join(["AB"] * 32)
    # a wrong password too: had a login been sent, the error would be vCenter refusing it
    login = VCenterLogin(tls_lab.url, tls_lab.username, "wrong", tls_mode="thumbprint", tls_thumbprint=wrong)
    with pytest.raises(VSphereError, match="TLS thumbprint mismatch") as e:
        VSphere.connect(login)
    assert tls_lab.thumbprint() in str(e.value) and wrong in str(e.value)
    assert _session_count(tls_lab) == before


@pytest.mark.parametrize("form", ["sha256", "sha256-plain-lower", "sha1"])
def test_the_pinned_thumbprint_connects(tls_lab: Lab, form: str) -> None:
    pin = tls_lab.thumbprint("sha1" if form == "sha1" else "sha256")
    if form == "sha256-plain-lower":
        pin = pin.replace(":", "").lower()
    login = VCenterLogin(
        tls_lab.url, tls_lab.username, tls_lab.password, tls_mode="thumbprint", tls_thumbprint=pin
    )
    assert login.tls_thumbprint == tls_lab.thumbprint("sha1" if form == "sha1" else "sha256")
    vs = VSphere.connect(login)
    try:
        assert [d.name for d in vs.datacenters()] == ["DC0"]
    finally:
        vs.disconnect()


def test_verify_with_the_labs_certificate_as_ca_file(tls_lab: Lab) -> None:
    configure_tls(tls_lab.ca_file)
    try:
        vs = VSphere.connect(VCenterLogin(tls_lab.url, tls_lab.username, tls_lab.password))
        vs.disconnect()
    finally:
        configure_tls(None)


def test_insecure_connects_and_logs_a_warning_naming_the_vcenter(
    tls_lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    login = VCenterLogin(tls_lab.url, tls_lab.username, tls_lab.password, tls_mode="insecure")
    with caplog.at_level(logging.WARNING, logger="vma.vsphere.client"):
        for _ in range(2):
            VSphere.connect(login).disconnect()
    warnings = [r for r in caplog.records if "TLS verification" in r.getMessage()]
    assert len(warnings) == 2  # every connect
    assert all(tls_lab.url in r.getMessage() and r.levelno == logging.WARNING for r in warnings)


def test_thumbprint_forms_are_checked() -> None:
    with pytest.raises(ValueError, match="tls_thumbprint must be"):
        VCenterLogin("vc", "u", "p", tls_mode="thumbprint", tls_thumbprint="AB:CD")
    with pytest.raises(ValueError, match="tls_thumbprint must be"):
        VCenterLogin("vc", "u", "p", tls_mode="thumbprint")
    with pytest.raises(ValueError, match="only with tls_mode 'thumbprint'"):
        VCenterLogin("vc", "u", "p", tls_thumbprint=":".join(["AB"] * 32))
    assert normalize_thumbprint("ab" * 20) == ":".join(["AB"] * 20)


async def test_discover_api_checks_the_certificate_as_asked(vma: Vma, tls_lab: Lab) -> None:
    body = {"vcenter": tls_lab.url, "username": tls_lab.username, "password": tls_lab.password}
    r = await vma.post("/api/v1/discover", body)
    assert r.status_code == 502 and "TLS certificate verification failed" in r.json()["error"]
    wrong = {**body, "tls_mode": "thumbprint", "tls_thumbprint": ":".join(["00"] * 32)}
    r = await vma.post("/api/v1/discover", wrong)
    assert r.status_code == 502 and "TLS thumbprint mismatch" in r.json()["error"]
    right = {**body, "tls_mode": "thumbprint", "tls_thumbprint": tls_lab.thumbprint()}
    r = await vma.post("/api/v1/discover", right)
    assert r.status_code == 200, r.text
    for bad in (
        {"tls_mode": "none"},
        {"tls_mode": "thumbprint", "tls_thumbprint": "not-hex"},
        {"tls_thumbprint": tls_lab.thumbprint()},
    ):
        r = await vma.post("/api/v1/discover", {**body, **bad})
        assert r.status_code == 400 and r.json()["code"] == "INVALID_REQUEST", r.text


def test_the_journal_keeps_the_tls_mode_for_recovery(tmp_path: Path) -> None:
    """Recovery reconnects from the journal: the login's TLS settings are kept with it."""
    pin = ":".join(["5A"] * 32)
    login = VCenterLogin("vc.example", "u", "p", tls_mode="thumbprint", tls_thumbprint=pin)
    journal = Journal(tmp_path)
    journal.record(Job("job-tls", ["/DC0/vm/vm1"], login, "", tmp_path))
    [record] = journal.records()
    assert record.login == login
