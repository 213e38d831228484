"""Finding the OMA's own VM in CloudStack.

The OMA runs inside a CloudStack VM (replica volumes are attached to it), and CloudStack knows
that VM's NICs by MAC and IP address. Detection compares the addresses of this host — read from
the OS (every interface but loopback; link-local IPv6 left out), or the configured ones
(``OMA_VM_MACS``, ``OMA_VM_IPS``) where the OS's are not the ones CloudStack knows (behind NAT,
in a container) — with the NICs of every VM the API key sees (``listVirtualMachines``
``listall=true``). A MAC match wins (MACs are unique in a zone); an IP is looked at only when no
MAC matched (private IPs repeat across isolated networks: two VMs with the same IP are reported
as ambiguous, never guessed between).

The answer explains itself: which addresses were looked for and where they came from, how many
VMs were compared, and which NIC matched.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, Literal

import psutil

from oma.cloudstack.client import CloudStackClient
from oma.cloudstack.resources import virtual_machines
from oma.config import OmaConfig
from pyapp.api import CONFLICT, ApiError

OMA_VM_NOT_FOUND = "OMA_VM_NOT_FOUND"


@dataclass(frozen=True)
class HostAddresses:
    macs: tuple[str, ...]
    ips: tuple[str, ...]
    source: Literal["config", "os"]

    def explain(self) -> dict[str, Any]:
        return {"source": self.source, "mac_addresses": list(self.macs), "ip_addresses": list(self.ips)}


def normalize_mac(value: str) -> str:
    """``02-FC-00-00-00-01`` → ``02:fc:00:00:00:01`` (ValueError when it is no MAC)."""
    digits = value.strip().lower().replace("-", ":").replace(".", "")
    parts = digits.split(":") if ":" in digits else [digits[i : i + 2] for i in range(0, len(digits), 2)]
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts):
        raise ValueError(f"not a MAC address: {value!r}")
    return ":".join(parts)


def normalize_ip(value: str) -> str:
    return str(ipaddress.ip_address(value.strip().split("%", 1)[0]))


def os_addresses() -> HostAddresses:
    """This host's MACs and IPs (loopback, all-zero MACs and link-local IPv6 left out)."""
    macs: list[str] = []
    ips: list[str] = []
    for _name, addresses in sorted(psutil.net_if_addrs().items()):
        for a in addresses:
            if a.family == psutil.AF_LINK:
                try:
                    mac = normalize_mac(a.address)
                except ValueError:
                    continue
                if mac != "00:00:00:00:00:00" and mac not in macs:
                    macs.append(mac)
            elif a.family in (socket.AF_INET, socket.AF_INET6):
                ip = ipaddress.ip_address(a.address.split("%", 1)[0])
                if not (ip.is_loopback or ip.is_link_local) and str(ip) not in ips:
                    ips.append(str(ip))
    return HostAddresses(tuple(macs), tuple(ips), "os")


def host_addresses(config: OmaConfig) -> HostAddresses:
    """The configured addresses when any is set, else the OS's."""
    if config.oma_vm_macs or config.oma_vm_ips:
        return HostAddresses(
            tuple(normalize_mac(m) for m in config.oma_vm_macs),
            tuple(normalize_ip(i) for i in config.oma_vm_ips),
            "config",
        )
    return os_addresses()


def _nic_ips(nic: dict[str, Any]) -> set[str]:
    out = set()
    for key in ("ip_address", "ip6_address"):
        if nic.get(key):
            try:
                out.add(normalize_ip(nic[key]))
            except ValueError:
                continue
    return out


async def detect_oma_vm(client: CloudStackClient, addresses: HostAddresses) -> dict[str, Any]:
    """The OMA VM as CloudStack knows it: ``{vm, matched_by, matched_address, nic, searched,
    vms_checked, message}``. 404 ``OMA_VM_NOT_FOUND`` when no VM has these addresses, 409 when
    several have; both with the explanation in ``details``."""
    if not addresses.macs and not addresses.ips:
        raise ApiError(
            404,
            OMA_VM_NOT_FOUND,
            "this host has no MAC or IP address to look for (set OMA_VM_MACS or OMA_VM_IPS)",
            {"searched": addresses.explain(), "vms_checked": 0},
        )
    vms = await virtual_machines(client)
    explanation = {"searched": addresses.explain(), "vms_checked": len(vms)}
    for matched_by, wanted in (("mac", set(addresses.macs)), ("ip", set(addresses.ips))):
        hits = [
            (vm, nic)
            for vm in vms
            for nic in vm["nics"]
            if (nic["mac_address"] in wanted if matched_by == "mac" else _nic_ips(nic) & wanted)
        ]
        by_vm = {vm["id"]: (vm, nic) for vm, nic in hits}
        if len(by_vm) > 1:
            candidates = [{"id": vm["id"], "name": vm["name"]} for vm, _ in by_vm.values()]
            raise ApiError(
                409,
                CONFLICT,
                f"several CloudStack VMs have this host's {matched_by.upper()} addresses: "
                + ", ".join(f"{c['name']} ({c['id']})" for c in candidates)
                + "; set oma_vm_id yourself",
                {**explanation, "candidates": candidates},
            )
        if by_vm:
            vm, nic = next(iter(by_vm.values()))
            address = nic["mac_address"] if matched_by == "mac" else sorted(_nic_ips(nic) & wanted)[0]
            return {
                "vm": vm,
                "matched_by": matched_by,
                "matched_address": address,
                "nic": nic,
                **explanation,
                "message": f"the OMA VM is {vm['name']} ({vm['id']}): its NIC {nic['id']} has"
                f" {matched_by.upper()} {address}, an address of this host ({addresses.source})",
            }
    raise ApiError(
        404,
        OMA_VM_NOT_FOUND,
        f"none of the {len(vms)} CloudStack VMs this API key sees has a NIC with this host's"
        f" addresses ({addresses.source}: MACs {', '.join(addresses.macs) or 'none'};"
        f" IPs {', '.join(addresses.ips) or 'none'}): is the OMA a VM of this CloudStack, in an"
        " account the key sees? Otherwise set oma_vm_id yourself",
        explanation,
    )
