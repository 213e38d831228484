"""Run the lab by hand: ``python -m lab --dir /tmp/lab --vm vm1=64,16 --vm db1=128``.

Each ``--vm NAME=SIZES`` creates a VM with one disk per size (MiB); the first disk holds a GPT with
an ext4 root file system (``/etc/hostname``, ``/etc/os-release``) and a FAT ESP. Prints the SDK URL,
the credentials and the VMs' disks, then serves until interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from lab.filesystems import MiB, Partition
from lab.vsphere import DiskSpec, Lab


def _vm_arg(text: str) -> tuple[str, list[int]]:
    name, _, sizes = text.partition("=")
    if not name or not sizes:
        raise argparse.ArgumentTypeError("expected NAME=SIZE[,SIZE...] (MiB)")
    return name, [int(s) * MiB for s in sizes.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab", description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, required=True, help="lab directory (datastores, journals, log)")
    p.add_argument("--vm", type=_vm_arg, action="append", default=[], help="NAME=SIZE[,SIZE...] in MiB")
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
            vm = lab.create_vm(name, specs)
            for d in vm.disks:
                print(f"{vm.name} ({vm.moref}) disk {d.key}: {d.file_name} -> {d.image}")
        sys.stdout.flush()
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
