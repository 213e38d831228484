"""Run the lab by hand, and add VMs to a running lab.

    python -m lab [serve] --dir /tmp/lab [--vm vm1=64,16] [--boot-vm web1] [--qcda-window BYTES]
    python -m lab add-vm --dir /tmp/lab --name NAME --disk IMAGE [--disk IMAGE2] [--nic NETWORK[:MAC]]

``serve`` (the default) starts the simulator in ``--dir`` and serves until interrupted. Each
``--vm NAME=SIZES`` creates a VM with one disk per size (MiB); the first disk holds a GPT with an
ext4 root file system (``/etc/hostname``, ``/etc/os-release``) and a FAT ESP. Each ``--boot-vm
NAME`` creates a VM whose disk boots the lab guest (``docs/lab-boot.md``). It prints the SDK URL,
the credentials and the VMs' disks.

``add-vm`` adds a VM to the lab running in ``--dir`` (started by ``serve``, the demo or a test: a
running lab announces itself in ``<dir>/lab.json``), from disk images an operator brings: raw or
QCOW2, each copied as raw into the datastore (QCOW2 converted by ``qemu-img``), in order (the first
is the one a VM boots from). Each ``--nic NETWORK[:MAC]`` is a network card on that vCenter network
(``VM Network``, or a distributed port group such as ``DC0_DVPG0``) with that MAC (vCenter makes
one when it is left out). A separate command rather than an option of ``serve``: images come
while the lab runs (next to the OMA and the VMA), converting one takes a while, and the lab keeps
serving the VMs it has meanwhile.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path

from lab.filesystems import DiskBuildError, MiB, Partition
from lab.simulator import LabError
from lab.vsphere import DiskSpec, Lab, LabVM, NicSpec

_NIC_RE = re.compile(r"^(?P<network>.+?)(?::(?P<mac>[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}))?$")


def _vm_arg(text: str) -> tuple[str, list[int]]:
    name, _, sizes = text.partition("=")
    if not name or not sizes:
        raise argparse.ArgumentTypeError("expected NAME=SIZE[,SIZE...] (MiB)")
    return name, [int(s) * MiB for s in sizes.split(",")]


def _nic_arg(text: str) -> NicSpec:
    m = _NIC_RE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError("expected NETWORK or NETWORK:MAC ('VM Network:00:50:56:01:02:03')")
    try:
        return NicSpec(m["network"], m["mac"].lower() if m["mac"] else None)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _show(vm: LabVM) -> None:
    for d in vm.disks:
        print(f"{vm.name} ({vm.moref}) disk {d.key}: {d.file_name} -> {d.image} ({d.capacity} bytes)")
    for n in vm.nics:
        print(f"{vm.name} ({vm.moref}) nic {n.key}: {n.network} {n.mac}")
    if vm.boot is not None:
        print(f"{vm.name} boots and prints sha256={vm.boot.data_sha256}")


def serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lab [serve]", description="Run the vSphere lab by hand.")
    p.add_argument("--dir", type=Path, required=True, help="lab directory (datastores, journals, log)")
    p.add_argument("--vm", type=_vm_arg, action="append", default=[], help="NAME=SIZE[,SIZE...] in MiB")
    p.add_argument("--boot-vm", action="append", default=[], metavar="NAME", help="a VM whose disk boots")
    p.add_argument(
        "--qcda-window", type=int, default=0, help="bytes per QueryChangedDiskAreas answer (0: 1/3)"
    )
    args = p.parse_args(argv)

    with Lab(args.dir, qcda_window=args.qcda_window) as lab:
        print(f"url: {lab.url}\nusername: {lab.username}\npassword: {lab.password}")
        for name, sizes in args.vm:
            specs = []
            for i, size in enumerate(sizes):
                parts: list[Partition] = []
                if i == 0 and size >= 48 * MiB:
                    files = {"etc/hostname": f"{name}\n".encode(), "etc/os-release": b'NAME="Lab Linux"\n'}
                    parts = [
                        Partition(8 * MiB, "fat", "EFI"),
                        Partition(size - 10 * MiB, "ext4", "root", files),
                    ]
                specs.append(DiskSpec(size, parts))
            _show(lab.create_vm(name, specs))
        for name in args.boot_vm:
            _show(lab.create_boot_vm(name))
        sys.stdout.flush()
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)
    return 0


def add_vm(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lab add-vm",
        description="Add a VM made of raw or QCOW2 disk images to the lab running in --dir.",
    )
    p.add_argument("--dir", type=Path, required=True, help="the running lab's directory")
    p.add_argument("--name", required=True, help="the VM's name in vCenter")
    p.add_argument(
        "--disk", type=Path, action="append", required=True, metavar="IMAGE", help="raw or QCOW2 image"
    )
    p.add_argument(
        "--nic", type=_nic_arg, action="append", default=[], metavar="NETWORK[:MAC]", help="a network card"
    )
    p.add_argument("--guest-id", default="otherLinux64Guest", help="vSphere guest OS id")
    p.add_argument("--memory-mb", type=int, default=1024)
    p.add_argument("--cpus", type=int, default=1)
    p.add_argument("--datastore", default="LocalDS_0")
    p.add_argument("--powered-off", action="store_true", help="leave the VM powered off")
    args = p.parse_args(argv)
    try:
        lab = Lab.running(args.dir)
        try:
            vm = lab.create_vm(
                args.name,
                [DiskSpec.from_image(image) for image in args.disk],
                nics=args.nic or None,
                guest_id=args.guest_id,
                memory_mb=args.memory_mb,
                num_cpus=args.cpus,
                datastore=args.datastore,
                power_on=not args.powered_off,
            )
        finally:
            lab.stop()
    except (LabError, DiskBuildError, ValueError) as e:
        print(f"python -m lab add-vm: {e}", file=sys.stderr)
        return 1
    _show(vm)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["add-vm"]:
        return add_vm(args[1:])
    if args[:1] == ["serve"]:
        args = args[1:]
    return serve(args)


if __name__ == "__main__":
    raise SystemExit(main())
