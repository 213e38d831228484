"""The lab's bootable guest (lab/bootdisk): the image's bytes, and real boots under qemu.

Every boot runs ``qemu-system-x86_64`` under the accelerator the KVM probe chose (TCG on machines
whose KVM cannot run a guest). Missing tools fail these tests: they are installed by
scripts/bootstrap.sh.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from lab import DiskBuildError
from lab.bootdisk import (
    BootDiskInfo,
    BootMarker,
    GuestReportedError,
    NoBootableDisk,
    RunningVM,
    VmDisk,
    VmError,
    VmSpec,
    accelerator,
    build_boot_disk,
    find_marker,
    read_data,
    rewrite_data,
    zero_boot_sector,
)
from lab.bootdisk import image as image_mod
from lab.bootdisk import qemu as qemu_mod
from lab.bootdisk.initramfs import GUEST_MODULES, kernel_versions, module_load_order
from lab.bootdisk.qmp import Qmp

MiB = 1024 * 1024
DATA = b"replicated bytes of vm1\n" * 4096
MACS = ("52:54:00:aa:00:01", "52:54:00:aa:00:02")
#: A normal boot takes about 6 s under TCG on a loaded 2-core machine.
BOOT_DEADLINE_S = 60.0
TOOLS = ("qemu-system-x86_64", "qemu-img", "syslinux", "mcopy", "mdir", "mkfs.fat", "sfdisk", "cpio")


@pytest.fixture(autouse=True)
def tools() -> None:
    """Fail (never skip) when what the guest and the runner need is not installed."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    missing += [str(p) for p in (Path("/bin/busybox"), image_mod.MBR_CODE) if not p.is_file()]
    if not kernel_versions():
        missing.append("/boot/vmlinuz-* with /lib/modules (linux-image-amd64)")
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)}: run scripts/bootstrap.sh")


def build(tmp_path: Path, name: str = "vm1", data: bytes = DATA) -> BootDiskInfo:
    return build_boot_disk(tmp_path / f"{name}.img", vm_name=name, size=48 * MiB, data=data)


def boot(
    info: BootDiskInfo, tmp_path: Path, macs: tuple[str, ...] = (), timeout: float = BOOT_DEADLINE_S
) -> BootMarker:
    spec = VmSpec(info.vm_name, [VmDisk(info.path)], macs)
    accel = accelerator()  # probed before the clock starts
    began = time.monotonic()
    with RunningVM.start(spec, tmp_path / f"{info.vm_name}.console", accel=accel) as vm:
        marker = vm.wait_for_marker(timeout)
        print(f"{info.vm_name} booted under {vm.accel} in {time.monotonic() - began:.1f} s")
        assert vm.running(), "the guest idles after its boot line"
    assert vm.proc.returncode is not None
    return marker


def test_one_qemu_installed() -> None:
    """The bootstrap's promise: qemu-img (and qemu-nbd) and the VM runner are one qemu."""
    versions = [
        re.search(r"version (\S+)", subprocess.run([t, "--version"], capture_output=True, text=True).stdout)
        for t in ("qemu-img", "qemu-system-x86_64")
    ]
    assert all(versions)
    assert versions[0] and versions[1] and versions[0][1] == versions[1][1]
    nbd = subprocess.run(["qemu-nbd", "--version"], capture_output=True, text=True, check=True).stdout
    assert versions[0][1] in nbd


def test_image_bytes(tmp_path: Path) -> None:
    info = build(tmp_path)
    raw = info.path.read_bytes()
    assert len(raw) == 48 * MiB
    # MBR: syslinux's boot code, the signature, partition 1 active FAT, partition 2 FAT after it.
    assert raw[:440] == image_mod.MBR_CODE.read_bytes()[:440]
    assert raw[510:512] == b"\x55\xaa"
    entries = [raw[446 + 16 * i : 462 + 16 * i] for i in range(4)]
    (boot_flag, boot_type, boot_lba, boot_sectors) = _entry(entries[0])
    (data_flag, data_type, data_lba, data_sectors) = _entry(entries[1])
    assert (boot_flag, boot_type) == (0x80, 0x0C)
    assert (data_flag, data_type) == (0x00, 0x0C)
    assert boot_lba * 512 == info.boot.start == MiB
    assert boot_sectors * 512 == info.boot.size
    assert data_lba * 512 == info.data.start == info.boot.start + info.boot.size
    assert (data_lba + data_sectors) * 512 == info.data.start + info.data.size == 48 * MiB
    assert entries[2] == entries[3] == bytes(16)
    # The boot partition's boot sector is syslinux's, with the partition's first sector as its
    # hidden sectors; ldlinux.sys is on the file system.
    vbr = raw[info.boot.start : info.boot.start + 512]
    assert vbr[3:11] == b"SYSLINUX"
    assert vbr[510:512] == b"\x55\xaa"
    assert struct.unpack_from("<I", vbr, 0x1C)[0] == info.boot.start // 512
    listing = subprocess.run(
        ["mdir", "-a", "-b", "-i", f"{info.path}@@{info.boot.start}", "::"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    names = {line.rsplit("/", 1)[-1].lower() for line in listing.split()}
    assert {"ldlinux.sys", "ldlinux.c32", "syslinux.cfg", "vmlinuz", "initrd.gz"} <= names
    assert "console=ttyS0" in _mtype(info, "syslinux.cfg").decode()
    assert read_data(info) == DATA
    assert info.data_sha256 == hashlib.sha256(DATA).hexdigest()


def test_initramfs_holds_busybox_modules_and_the_identity(tmp_path: Path) -> None:
    info = build(tmp_path, "vm-identity")
    archive = gzip.decompress(_mtype(info, "initrd.gz"))
    listing = subprocess.run(
        ["cpio", "-t", "-v", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()  # cpio itself reads what the kernel will unpack
    assert re.search(r"^crw-------.* 5,\s+1 .* dev/console$", listing, re.M)
    assert re.search(r"^-rwxr-xr-x .* init$", listing, re.M)
    assert re.search(r"^lrwxrwxrwx .* bin/sh -> busybox$", listing, re.M)
    out = tmp_path / "unpacked"
    out.mkdir()
    subprocess.run(["cpio", "-i", "-d", "--quiet"], input=archive, cwd=out, check=True)
    assert (out / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    init = (out / "init").read_text()
    assert "VM=vm-identity\n" in init
    loaded = re.search(r"for m in ([^;]+);", init)
    assert loaded is not None
    order = loaded[1].split()
    assert {f"{m}.ko" for m in GUEST_MODULES} <= set(order)
    # Dependencies first: virtio_ring before virtio before virtio_pci; fat before vfat.
    assert order.index("virtio_ring.ko") < order.index("virtio.ko") < order.index("virtio_pci.ko")
    assert order.index("fat.ko") < order.index("vfat.ko")
    for name in order:
        assert (out / "lib/modules" / name).read_bytes()[:4] == b"\x7fELF"
    paths = module_load_order(info.kernel_version, ["virtio_blk"])
    assert [p.name for p in paths] == ["virtio_ring.ko", "virtio.ko", "virtio_blk.ko"]


def test_builds_are_reproducible_but_for_the_boot_loader_times(tmp_path: Path) -> None:
    """syslinux's installer copies ldlinux.sys and ldlinux.c32 with mtools, which stamps them with
    the clock: at most their directory entries' time fields differ, all else is byte-identical."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = build(tmp_path / "a")
    time.sleep(2.1)  # FAT times count in 2 s steps: b's boot loader is stamped differently
    b = build(tmp_path / "b")
    raw_a, raw_b = a.path.read_bytes(), b.path.read_bytes()
    differing = [i for i in range(0, len(raw_a), 4096) if raw_a[i : i + 4096] != raw_b[i : i + 4096]]
    assert len(differing) <= 1, "only the boot partition's root directory"
    for block in differing:
        assert a.boot.start <= block < a.boot.start + a.boot.size
        diff = [i for i in range(block, block + 4096) if raw_a[i] != raw_b[i]]
        assert len(diff) <= 2 * 8, "two directory entries' time and date fields at the most"


@pytest.mark.interop
def test_boot_prints_identity_digest_and_macs(tmp_path: Path) -> None:
    info = build(tmp_path, "vm-boot")
    marker = boot(info, tmp_path, MACS)
    assert marker.vm == "vm-boot"
    assert marker.data_file == "data.bin"
    assert marker.data_bytes == len(DATA)
    assert marker.sha256 == hashlib.sha256(DATA).hexdigest() == info.data_sha256
    assert marker.macs == MACS


@pytest.mark.interop
def test_rewritten_data_changes_the_digest_at_the_next_boot(tmp_path: Path) -> None:
    info = build(tmp_path, "vm-rewrite")
    new = b"the guest wrote this between passes\n" * 3000
    written = rewrite_data(info.path, info, new)
    assert written, "the rewrite changed blocks"
    assert all(info.data.start <= o and o + n <= info.data.start + info.data.size for o, n in written)
    assert sum(n for _, n in written) < info.data.size // 4, "only the blocks that differ are written"
    assert read_data(info) == new
    marker = boot(info, tmp_path)
    assert marker.sha256 == hashlib.sha256(new).hexdigest() != info.data_sha256
    assert marker.data_bytes == len(new)


@pytest.mark.interop
def test_zeroed_boot_sector_never_prints_the_marker(tmp_path: Path) -> None:
    info = build(tmp_path, "vm-broken")
    zero_boot_sector(info.path)
    assert info.path.read_bytes()[:512] == bytes(512)
    spec = VmSpec(info.vm_name, [VmDisk(info.path)])
    with RunningVM.start(spec, tmp_path / "broken.console") as vm:
        # the firmware says so at once (its log, not the serial console)
        with pytest.raises(NoBootableDisk, match=r"Boot failed: not a bootable disk.*No bootable device"):
            vm.wait_for_marker(BOOT_DEADLINE_S)
        assert vm.running(), "a disk that does not boot leaves qemu running, with no boot line"
    assert "MOVER-LAB-BOOT" not in vm.console_text()
    assert "No bootable device." in vm.firmware_text()


def test_a_qemu_that_cannot_start_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(508))  # a QCOW2 header of version 0
    before = set(Path(tempfile.gettempdir()).glob("lab-qemu-*"))
    with pytest.raises(VmError, match=r"qemu for vm1 exited \(1\): .*Unsupported qcow2 version 0"):
        RunningVM.start(VmSpec("vm1", [VmDisk(bad, "qcow2")]), tmp_path / "c", accel="tcg")
    assert set(Path(tempfile.gettempdir()).glob("lab-qemu-*")) == before, "its QMP directory is removed"


def test_start_returns_once_qemu_is_up(tmp_path: Path) -> None:
    disk = tmp_path / "blank.img"
    disk.write_bytes(bytes(MiB))
    with RunningVM.start(VmSpec("vm1", [VmDisk(disk)]), tmp_path / "c", accel="tcg") as vm:
        with Qmp.connect(vm.control_dir / "qmp.sock", 5) as qmp:
            assert qmp.execute("query-status")["status"] == "running"
            assert qmp.execute("query-name") == {"name": "vm1"}
        ref = vm.process_ref()
        assert ref is not None and ref.alive()
    assert not ref.alive() and not vm.control_dir.exists()


def test_accelerator_is_probed_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = accelerator()
    assert chosen in ("kvm", "tcg")

    def probe_again() -> qemu_mod.ProbeResult:
        raise AssertionError("probed twice")

    monkeypatch.setattr(qemu_mod, "probe_kvm", probe_again)
    assert accelerator() == chosen


def test_qemu_command_line(tmp_path: Path) -> None:
    spec = VmSpec("vm1", [VmDisk(tmp_path / "a,b.img"), VmDisk(tmp_path / "c.qcow2", "qcow2")], MACS[:1])
    cmd = qemu_mod.qemu_command(spec, tmp_path / "console", "tcg")
    joined = " ".join(cmd)
    assert "-machine pc,accel=tcg -cpu qemu64 -m 256" in joined
    assert f"file={tmp_path}/a,,b.img,if=virtio,index=0,format=raw" in cmd
    assert f"file={tmp_path}/c.qcow2,if=virtio,index=1,format=qcow2" in cmd
    assert "virtio-net-pci,netdev=nic0,mac=52:54:00:aa:00:01,romfile=" in cmd
    assert "user,id=nic0,restrict=on" in cmd
    assert f"file,id=firmware,path={tmp_path}/console.firmware.log" in cmd
    assert "isa-debugcon,iobase=0x402,chardev=firmware" in cmd
    with_qmp = qemu_mod.qemu_command(spec, tmp_path / "console", "tcg", tmp_path / "q.sock")
    assert with_qmp[with_qmp.index("-qmp") + 1] == f"unix:{tmp_path}/q.sock,server=on,wait=off"
    assert "-qmp" not in cmd


def test_bad_specs_and_missing_tools_are_clear_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="lab VM names"):
        VmSpec("bad name; reboot", [VmDisk(tmp_path / "x.img")])
    with pytest.raises(ValueError, match="unicast MAC"):
        VmSpec("vm1", [VmDisk(tmp_path / "x.img")], ["01:00:5e:00:00:01"])
    with pytest.raises(ValueError, match="no disk"):
        VmSpec("vm1", [])
    with pytest.raises(VmError, match="no disk image"):
        RunningVM.start(VmSpec("vm1", [VmDisk(tmp_path / "absent.img")]), tmp_path / "c", accel="tcg")
    with pytest.raises(ValueError, match="multiple of 1 MiB"):
        build_boot_disk(tmp_path / "small.img", vm_name="vm1", size=16 * MiB, data=b"x")
    (tmp_path / "x.img").write_bytes(bytes(512))
    monkeypatch.setattr(qemu_mod, "QEMU", "qemu-system-absent")
    with pytest.raises(VmError, match=r"qemu-system-x86 .*bootstrap"):
        RunningVM.start(VmSpec("vm1", [VmDisk(tmp_path / "x.img")]), tmp_path / "c", accel="tcg")
    monkeypatch.setattr(image_mod, "MBR_CODE", tmp_path / "no-mbr.bin")
    with pytest.raises(DiskBuildError, match="syslinux-common"):
        build(tmp_path)


def test_marker_parsing() -> None:
    line = "MOVER-LAB-BOOT vm=vm1 data=data.bin bytes=3 sha256=" + "ab" * 32 + " macs=-"
    console = f"SYSLINUX 6.04\r\n\x00{line}\r\n"
    marker = find_marker(console, "vm1")
    assert marker is not None
    assert (marker.vm, marker.data_bytes, marker.macs, marker.line) == ("vm1", 3, (), line)
    assert find_marker(console, "vm2") is None
    assert find_marker("SYSLINUX 6.04\r\n", "vm1") is None
    with pytest.raises(GuestReportedError, match="error=mount-data-partition"):
        find_marker("MOVER-LAB-ERROR vm=vm1 error=mount-data-partition\n", "vm1")


def _entry(raw: bytes) -> tuple[int, int, int, int]:
    flag, ptype, lba, sectors = raw[0], raw[4], *struct.unpack_from("<II", raw, 8)
    return flag, ptype, lba, sectors


def _mtype(info: BootDiskInfo, name: str) -> bytes:
    return subprocess.run(
        ["mcopy", "-n", "-i", f"{info.path}@@{info.boot.start}", f"::{name}", "-"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
