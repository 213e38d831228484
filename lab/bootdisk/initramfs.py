"""The lab guest's initramfs: a gzip-compressed ``newc`` cpio archive written in Python.

It holds the static busybox of Debian's ``busybox-static`` (``/bin/busybox`` plus one symlink per
applet the init script uses), ``/dev/console`` (the kernel opens it for init's standard streams
before any ``/dev`` is mounted), the kernel modules the guest needs that Debian's kernel builds as
modules (virtio PCI, virtio block and net, FAT and its code pages), in load order, and ``/init``:
a shell script that mounts ``proc``, ``sys`` and ``devtmpfs``, loads the modules, mounts the data
partition read-only, prints the boot line of :mod:`lab.bootdisk.marker` and idles forever (PID 1
must not exit).

The archive is reproducible: entries in a fixed order, every time and owner fixed, gzip without
a time stamp.
"""

from __future__ import annotations

import gzip
import io
import lzma
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.filesystems import FIXED_TIME

from .marker import ERROR_MARKER, MARKER, check_vm_name

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
MODULES_ROOT = Path("/lib/modules")
#: The modules the guest loads (with what they depend on, from ``modules.dep``): the disk and
#: network cards as virtio PCI devices, the FAT data partition (vfat reads names through the
#: default code page and I/O character set of Debian's kernel: cp437 and ascii).
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "vfat", "nls_cp437", "nls_ascii")
#: The busybox applets ``/init`` calls (each a symlink to busybox in ``/bin``).
APPLETS = ("sh", "mount", "umount", "mkdir", "insmod", "sleep", "sha256sum", "wc", "cat", "echo")
#: The data partition as the guest sees it: partition 2 of the first virtio disk.
DATA_DEVICE = "/dev/vda2"

_NEWC_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class InitramfsError(RuntimeError):
    """What the initramfs needs is missing on this machine (a package not installed)."""


@dataclass(frozen=True)
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _newc_header(ino: int, entry: _Entry) -> bytes:
    name = entry.name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, FIXED_TIME, len(entry.data), 0, 0, *entry.rdev, len(name), 0)
    header = _NEWC_MAGIC + b"".join(f"{v:08x}".encode() for v in fields) + name
    return header + b"\0" * (-len(header) % 4)


def newc_archive(entries: Iterable[_Entry]) -> bytes:
    """The ``newc`` cpio archive of ``entries`` (what ``cpio -H newc -o`` writes, and the format
    the kernel unpacks into its root file system)."""
    out = io.BytesIO()
    for ino, entry in enumerate([*entries, _Entry(_TRAILER, 0)], 1):
        out.write(_newc_header(ino if entry.name != _TRAILER else 0, entry))
        out.write(entry.data)
        out.write(b"\0" * (-len(entry.data) % 4))
    return out.getvalue()


def kernel_versions() -> list[str]:
    """The Debian kernels installed (``/boot/vmlinuz-<version>`` with ``/lib/modules/<version>``),
    oldest first."""

    def key(v: str) -> list[int | str]:
        return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", v)]

    found = [
        p.name.removeprefix("vmlinuz-")
        for p in Path("/boot").glob("vmlinuz-*")
        if (MODULES_ROOT / p.name.removeprefix("vmlinuz-") / "modules.dep").is_file()
    ]
    return sorted(found, key=key)


def module_load_order(version: str, wanted: Sequence[str]) -> list[Path]:
    """The module files of ``wanted`` and of everything they depend on, each after its
    dependencies (``modules.dep`` of kernel ``version``). A module built into the kernel
    (``modules.builtin``) needs no file and is left out."""
    root = MODULES_ROOT / version
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (root / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[_module_name(path)] = path
    builtin_file = root / "modules.builtin"
    builtin = {_module_name(p) for p in builtin_file.read_text().split()} if builtin_file.is_file() else set()
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
        elif name not in builtin:
            raise InitramfsError(f"kernel {version} has no module {name!r} (modules.dep)")
    return [root / p for p in order]


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    raise InitramfsError(f"{path}: compressed in a way the lab cannot unpack (only .ko, .ko.xz, .ko.gz)")


def init_script(vm_name: str, data_file: str, modules: Sequence[str]) -> str:
    """The guest's ``/init``: ``modules`` are the names under ``/lib/modules`` in load order."""
    check_vm_name(vm_name)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", data_file):
        raise ValueError(f"the data file is a plain name at the data partition's root: {data_file!r}")
    return f"""#!/bin/sh
# The mover lab's guest (lab/bootdisk): print the boot line, then idle. PID 1 never exits.
export PATH=/bin
VM={vm_name}
idle() {{ while :; do sleep 3600; done; }}
fail() {{ echo "{ERROR_MARKER} vm=$VM error=$1"; idle; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {" ".join(modules)}; do insmod /lib/modules/$m || fail "insmod-$m"; done
n=0
while [ ! -b {DATA_DEVICE} ]; do
    n=$((n + 1)); [ $n -gt 200 ] && fail no-data-partition; sleep 0.05
done
mkdir -p /data
mount -t vfat -o ro {DATA_DEVICE} /data || fail mount-data-partition
[ -f /data/{data_file} ] || fail no-data-file
sum=$(sha256sum /data/{data_file}) || fail read-data-file
bytes=$(wc -c < /data/{data_file})
macs=
for nic in /sys/class/net/*; do
    [ "${{nic##*/}}" = lo ] && continue
    [ -f "$nic/address" ] && macs="$macs${{macs:+,}}$(cat "$nic/address")"
done
umount /data
echo "{MARKER} vm=$VM data={data_file} bytes=$bytes sha256=${{sum%% *}} macs=${{macs:--}}"
idle
"""


def build_initramfs(vm_name: str, data_file: str, kernel_version: str) -> bytes:
    """The gzip-compressed initramfs of one lab guest for Debian kernel ``kernel_version``."""
    if not BUSYBOX.is_file():
        raise InitramfsError(f"{BUSYBOX} is missing: install busybox-static (scripts/bootstrap.sh)")
    module_paths = module_load_order(kernel_version, GUEST_MODULES)
    modules: Mapping[str, bytes] = {p.name.split(".ko", 1)[0] + ".ko": _module_bytes(p) for p in module_paths}
    directory, regular, link = stat.S_IFDIR | 0o755, stat.S_IFREG, stat.S_IFLNK | 0o777
    entries = [_Entry(d, directory) for d in ("bin", "dev", "proc", "sys", "data", "lib", "lib/modules")]
    entries.append(_Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(_Entry("bin/busybox", regular | 0o755, BUSYBOX.read_bytes()))
    entries += [_Entry(f"bin/{a}", link, b"busybox") for a in APPLETS]
    entries += [_Entry(f"lib/modules/{name}", regular | 0o644, data) for name, data in modules.items()]
    script = init_script(vm_name, data_file, list(modules))
    entries.append(_Entry("init", regular | 0o755, script.encode()))
    return gzip.compress(newc_archive(entries), compresslevel=6, mtime=0)
