# pyvmomi's stubs leave the data-object constructors and pyVim's helpers unannotated:
# mypy: disable-error-code="no-untyped-call"
"""Everything the VMA asks vCenter, through pyvmomi: discovery, CBT, snapshots, changed areas,
and a VM's power (state, guest shutdown, power off and on).

pyvmomi blocks, so every call here is synchronous and the async side runs it through
:func:`run` (a worker thread under :data:`LIMITER`). One :class:`VSphere` holds one session; it
is used by one job (or one discover request) and disconnected at its end.

VMware pitfalls handled here (see docs/vma.md):

- ``QueryChangedDiskAreas`` may answer for only part of the disk: :func:`collect_changed_areas`
  loops from offset 0 on ``startOffset + length`` until the capacity is covered, and treats an
  answer of zero length (or one that does not start where it was asked) as an error rather than
  looping forever;
- CBT on a VM needs ``changeTrackingEnabled`` *and* each disk's ``scsiB:U.ctkEnabled``, and on a
  running VM only takes effect at the next stun: :meth:`VSphere.ensure_cbt` does all three;
- a change ID whose UUID part differs from the stored one means CBT was reset:
  :func:`same_cbt_epoch` tells the workflow to make a full pass;
- snapshots are removed only by the managed object id the job created; a snapshot the VMA did
  not make is never touched.

Deadlines: a vCenter that stops answering must not hang a job. Every call through :func:`run`
has one (:data:`DEADLINES`, set from the configuration by the app): ``call`` seconds for a plain
call, ``task`` more for the methods that wait for a vCenter task (:data:`TASK_METHODS`: snapshot
create and remove, the CBT reconfiguration). The session's HTTP requests time out after ``call``
seconds too, so a thread left waiting on a silent vCenter ends soon after the job has failed; a
task is waited for by polling its state (short requests), never by one long poll.

TLS (:meth:`VSphere.connect`, per login's ``tls_mode``): ``verify`` (the default) checks vCenter's
certificate against the system CAs plus ``vcenter_ca_file`` and its name; ``thumbprint`` first
reads the certificate vCenter presents and compares its SHA-256 (or SHA-1) fingerprint with the
pinned one *before* any request, then trusts that certificate alone for the session's
connections; ``insecure`` checks nothing and logs a warning naming the vCenter on every connect.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, ParamSpec, Protocol, TypeVar, get_args
from urllib.parse import urlsplit

import trio
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from pyapp.thumbprint import normalize_thumbprint

log = logging.getLogger(__name__)

#: pyvmomi calls in flight in this process (each holds a worker thread while vCenter answers).
LIMITER = trio.CapacityLimiter(8)

P = ParamSpec("P")
T = TypeVar("T")


@dataclass
class Deadlines:
    """Seconds a vSphere call may take: ``call`` for one request (and each HTTP request of the
    session), ``task`` for waiting on a vCenter task (snapshots, reconfiguration)."""

    call: float = 60.0
    task: float = 1800.0
    #: Seconds between two reads of a running task's state.
    task_poll: float = 0.5


#: The process's deadlines (one VMA per process): set by ``create_app`` from ``VmaConfig``.
DEADLINES = Deadlines()

#: Functions that wait for vCenter tasks (:class:`VSphere` methods, and the cleanup API's and the
#: start-up recovery's snapshot removals): their deadline is ``call + task``.
TASK_METHODS = frozenset(
    {
        "create_snapshot",
        "remove_snapshot",
        "ensure_cbt",
        "_remove_snapshots",
        "remove_job_snapshots",
        "power_off_vm",
        "power_on_vm",
    }
)


def configure_deadlines(call: float, task: float) -> None:
    DEADLINES.call, DEADLINES.task = call, task


#: How the VMA checks vCenter's certificate (per credential, sent by the OMA with the login).
TlsMode = Literal["verify", "thumbprint", "insecure"]
TLS_MODES: tuple[str, ...] = get_args(TlsMode)


@dataclass
class TlsDefaults:
    """The process's TLS settings (one VMA per process): extra CA certificates for ``verify``."""

    ca_file: Path | None = None


#: Set by ``create_app`` from ``VmaConfig.vcenter_ca_file``.
TLS_DEFAULTS = TlsDefaults()


def configure_tls(ca_file: Path | None) -> None:
    TLS_DEFAULTS.ca_file = ca_file


def certificate_thumbprint(der: bytes, algorithm: str = "sha256") -> str:
    return ":".join(f"{b:02X}" for b in hashlib.new(algorithm, der).digest())


class VSphereError(Exception):
    """A vCenter operation failed; the message is safe to show to the API client."""


class VSphereTimeout(VSphereError):
    """vCenter did not answer within the call's deadline."""


def deadline_of(func: Callable[..., object]) -> float:
    name = getattr(func, "__name__", "")
    return DEADLINES.call + (DEADLINES.task if name in TASK_METHODS else 0.0)


async def run(func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a blocking pyvmomi call in a worker thread under :data:`LIMITER`, within its deadline
    (:func:`deadline_of`). On expiry :class:`VSphereTimeout`: the thread is left to end by its
    HTTP timeout (it only waits on vCenter; it writes nothing of ours)."""
    deadline = deadline_of(func)
    what = getattr(func, "__name__", "call")
    with trio.move_on_after(deadline) as scope:
        try:
            return await trio.to_thread.run_sync(
                lambda: func(*args, **kwargs), limiter=LIMITER, abandon_on_cancel=True
            )
        except TimeoutError as e:  # one HTTP request of the session timed out
            raise VSphereTimeout(
                f"vCenter did not answer within {DEADLINES.call:.0f} s ({what}): {e}"
            ) from e
        except OSError as e:
            raise VSphereError(f"vCenter connection failed ({what}): {e}") from e
    assert scope.cancelled_caught
    raise VSphereTimeout(f"vCenter did not answer within {deadline:.0f} s ({what})")


class ChangedAreasError(VSphereError):
    """QueryChangedDiskAreas gave an answer the loop cannot make progress with."""


class CbtResetError(VSphereError):
    """vCenter refused the stored change ID (CBT was reset or turned off since): a full pass is due."""


class VmNotFound(VSphereError):
    """vCenter has no VM with this managed object id (the API answers 404)."""

    def __init__(self, vm_id: str, host: str) -> None:
        super().__init__(f"vCenter {host} has no VM {vm_id}")
        self.vm_id = vm_id


@dataclass(frozen=True)
class VCenterLogin:
    """Where and how to log in. ``host`` is ``name``, ``name:port`` or a URL (``http://h:p/sdk``);
    ``tls_mode`` and ``tls_thumbprint`` say how vCenter's certificate is checked (module doc)."""

    host: str
    username: str
    password: str = field(repr=False)
    tls_mode: TlsMode = "verify"
    tls_thumbprint: str = ""

    def __post_init__(self) -> None:
        if self.tls_mode not in TLS_MODES:
            raise ValueError(f"tls_mode must be one of {', '.join(TLS_MODES)}, not {self.tls_mode!r}")
        if self.tls_mode == "thumbprint":
            object.__setattr__(self, "tls_thumbprint", normalize_thumbprint(self.tls_thumbprint))
        elif self.tls_thumbprint:
            raise ValueError("tls_thumbprint is given only with tls_mode 'thumbprint'")

    def endpoint(self) -> tuple[str, str, int]:
        """``(protocol, host, port)``."""
        if "://" in self.host:
            u = urlsplit(self.host)
            protocol = u.scheme or "https"
            return protocol, u.hostname or "", u.port or (443 if protocol == "https" else 80)
        name, _, port = self.host.rpartition(":") if self.host.count(":") == 1 else (self.host, "", "")
        if port and name:
            return "https", name, int(port)
        return "https", self.host, 443


@dataclass(frozen=True)
class DiskInfo:
    key: int
    label: str
    capacity: int
    file_name: str  # datastore path of the backing, e.g. "[ds1] vm1/vm1.vmdk"
    change_id: str | None  # the backing's change ID (None while CBT is off)
    ctk_key: str  # extraConfig key of the disk's CBT switch, e.g. "scsi0:1.ctkEnabled"
    cbt_enabled: bool

    @property
    def disk_id(self) -> str:
        """The OMA's name for the disk: ``disk-<device key>``."""
        return f"disk-{self.key}"


@dataclass(frozen=True)
class VmPower:
    """A VM's power as vCenter reports it now."""

    vm_id: str
    name: str
    power_state: str  # poweredOn | poweredOff | suspended
    #: VMware Tools run in the guest (``guest.toolsRunningStatus`` is ``guestToolsRunning``): only
    #: then can the guest be asked to shut down.
    tools_running: bool


@dataclass(frozen=True)
class SnapshotRef:
    vm_moref: str
    moref: str
    name: str


# -- change IDs and the QueryChangedDiskAreas loop -------------------------------------------------


def cbt_epoch(change_id: str) -> str:
    """The UUID part of a change ID ``"52 de ... 04/17"`` -> ``"52 de ... 04"``."""
    uuid, sep, _ = change_id.rpartition("/")
    return uuid if sep else change_id


def same_cbt_epoch(previous: str, current: str | None) -> bool:
    """Whether the stored change ID can be a base for the snapshot's: same CBT epoch (UUID)."""
    return current is not None and previous not in ("", "*") and cbt_epoch(previous) == cbt_epoch(current)


class ChangeInfo(Protocol):
    """The fields of ``vim.DiskChangeInfo`` the loop reads."""

    startOffset: int
    length: int
    changedArea: Any


def merge_extents(areas: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, length in sorted(areas):
        if length <= 0:
            continue
        if out and start <= out[-1][0] + out[-1][1]:
            s, n = out[-1]
            out[-1] = (s, max(n, start + length - s))
        else:
            out.append((start, length))
    return out


def collect_changed_areas(
    query: Callable[[int], ChangeInfo], capacity: int, *, max_answers: int = 1_000_000
) -> list[tuple[int, int]]:
    """Loop ``query(start_offset)`` from 0 until ``capacity`` is covered; the merged areas.

    Each answer covers ``[startOffset, startOffset + length)``; the next query starts where it
    ends. An answer of zero (or negative) length, one that starts elsewhere than asked, or an area
    outside its answer's range is an error: looping on it would never end or copy wrong bytes.
    """
    areas: list[tuple[int, int]] = []
    offset = 0
    answers = 0
    while offset < capacity:
        info = query(offset)
        answers += 1
        if answers > max_answers:
            raise ChangedAreasError(f"QueryChangedDiskAreas did not cover the disk in {max_answers} answers")
        start, length = int(info.startOffset), int(info.length)
        if start != offset:
            raise ChangedAreasError(
                f"QueryChangedDiskAreas answered for offset {start} when asked for {offset}"
            )
        if length <= 0:
            raise ChangedAreasError(
                f"QueryChangedDiskAreas answered with length {length} at offset {offset} of {capacity}:"
                " no progress possible"
            )
        end = min(start + length, capacity)
        for area in info.changedArea or []:
            a_start, a_len = int(area.start), int(area.length)
            if a_start < start or a_start + a_len > start + length or a_len < 0:
                raise ChangedAreasError(
                    f"changed area [{a_start}, {a_start + a_len}) lies outside its answer [{start}, {end})"
                )
            areas.append((a_start, min(a_len, capacity - a_start)))
        offset = start + length
    return merge_extents(areas)


# -- the session ---------------------------------------------------------------------------------------


def _disk_ctk_key(disk: Any, controllers: dict[int, Any]) -> str:
    ctrl = controllers.get(disk.controllerKey)
    if isinstance(ctrl, vim.vm.device.VirtualSCSIController):
        prefix = "scsi"
    elif isinstance(ctrl, vim.vm.device.VirtualSATAController):
        prefix = "sata"
    elif isinstance(ctrl, vim.vm.device.VirtualNVMEController):
        prefix = "nvme"
    else:
        prefix = "ide"
    bus = ctrl.busNumber if ctrl is not None else 0
    return f"{prefix}{bus}:{disk.unitNumber}.ctkEnabled"


def disks_of(devices: Iterable[Any], extra_config: Iterable[Any] = ()) -> list[DiskInfo]:
    devices = list(devices)
    controllers = {d.key: d for d in devices if isinstance(d, vim.vm.device.VirtualController)}
    extra = {o.key: str(o.value) for o in extra_config or []}
    out = []
    for d in devices:
        if not isinstance(d, vim.vm.device.VirtualDisk):
            continue
        backing = d.backing
        ctk_key = _disk_ctk_key(d, controllers)
        capacity = int(d.capacityInBytes or (d.capacityInKB or 0) * 1024)
        change_id = getattr(backing, "changeId", None) or None
        out.append(
            DiskInfo(
                key=int(d.key),
                label=d.deviceInfo.label if d.deviceInfo is not None else "",
                capacity=capacity,
                file_name=str(getattr(backing, "fileName", "") or ""),
                change_id=change_id,
                ctk_key=ctk_key,
                cbt_enabled=extra.get(ctk_key, "").upper() != "FALSE" and change_id is not None,
            )
        )
    return out


def peer_certificate(host: str, port: int) -> bytes:
    """The DER certificate vCenter presents (a TLS handshake only: nothing is sent over it)."""
    probe = ssl.create_default_context()
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=max(1.0, DEADLINES.call)) as sock,
        probe.wrap_socket(sock, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise VSphereError(f"vCenter {host}:{port} presented no TLS certificate")
    return der


def tls_context(login: VCenterLogin, host: str, port: int, *, insecure: bool = False) -> ssl.SSLContext:
    """The SSL context for ``login``'s session (module doc). ``thumbprint``: the certificate vCenter
    presents now must match the pin (else :class:`VSphereError`, before any request), and becomes
    the only certificate the session's connections trust, so a later connection cannot present
    another one."""
    if insecure or login.tls_mode == "insecure":
        log.warning(
            "TLS verification of vCenter %s is disabled (tls_mode insecure): its identity is not checked",
            login.host,
            extra={"action": "vsphere_connect", "vcenter": login.host, "tls_mode": "insecure"},
        )
        return ssl._create_unverified_context()
    if login.tls_mode == "thumbprint":
        der = peer_certificate(host, port)
        algorithm = "sha1" if len(login.tls_thumbprint) == 59 else "sha256"
        seen = certificate_thumbprint(der, algorithm)
        if seen != login.tls_thumbprint:
            raise VSphereError(
                f"vCenter {login.host}: TLS thumbprint mismatch: the certificate presented has"
                f" {algorithm.upper()} {seen}, the credential pins {login.tls_thumbprint}; not logging in"
            )
        pinned = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        pinned.check_hostname = False  # the pin names the certificate, not the host
        pinned.load_verify_locations(cadata=der)
        pinned.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the pinned leaf is the trust anchor
        return pinned
    context = ssl.create_default_context()
    if TLS_DEFAULTS.ca_file is not None:
        context.load_verify_locations(cafile=str(TLS_DEFAULTS.ca_file))
    return context


class VSphere:
    """One pyvmomi session. Every method blocks: call it through :func:`run`."""

    def __init__(self, si: Any, login: VCenterLogin) -> None:
        self.si = si
        self.login = login
        self.content = si.RetrieveContent()

    @classmethod
    def connect(cls, login: VCenterLogin, *, insecure: bool = False) -> VSphere:
        """Log in to ``login``'s vCenter, checking its certificate as ``login.tls_mode`` says
        (``insecure=True``, the VMA-wide ``vcenter_insecure``, overrides it to ``insecure``)."""
        protocol, host, port = login.endpoint()
        kwargs: dict[str, Any] = {"httpConnectionTimeout": max(1, round(DEADLINES.call))}
        try:
            if protocol == "https":
                # Always an explicit context: without one pyvmomi skips verification for localhost.
                kwargs["sslContext"] = tls_context(login, host, port, insecure=insecure)
            si = SmartConnect(
                protocol=protocol, host=host, port=port, user=login.username, pwd=login.password, **kwargs
            )
        except vim.fault.InvalidLogin as e:
            raise VSphereError(f"vCenter {login.host} refused the login of {login.username}") from e
        except ssl.SSLCertVerificationError as e:
            raise VSphereError(
                f"vCenter {login.host}: TLS certificate verification failed ({e.verify_message});"
                " add its CA to the VMA's vcenter_ca_file or pin the certificate's"
                " thumbprint (tls_mode 'thumbprint')"
            ) from e
        except (OSError, vmodl.MethodFault) as e:
            raise VSphereError(f"cannot connect to vCenter {login.host}: {e}") from e
        return cls(si, login)

    def disconnect(self) -> None:
        try:
            Disconnect(self.si)
        except Exception as e:  # the session is going away either way
            log.warning("vCenter logout failed: %s", e, extra={"action": "vsphere_disconnect"})

    # -- inventory -----------------------------------------------------------------------------------

    def datacenters(self) -> list[Any]:
        return [e for e in self.content.rootFolder.childEntity if isinstance(e, vim.Datacenter)]

    def _walk_vms(self, folder: Any, prefix: str) -> Iterable[tuple[str, Any]]:
        """``(folder path, VM)`` for every VM under ``folder`` (the VM's name is fetched in bulk)."""
        for child in folder.childEntity:
            if isinstance(child, vim.VirtualMachine):
                yield prefix, child
            elif isinstance(child, vim.Folder):
                yield from self._walk_vms(child, f"{prefix}/{child.name}")
            elif isinstance(child, vim.VirtualApp):
                for vm in child.vm:
                    yield f"{prefix}/{child.name}", vm

    def properties(self, objs: list[Any], paths: list[str]) -> dict[str, dict[str, Any]]:
        """``paths`` of many VMs in one property-collector round (paged): moref -> path -> value.
        Unset properties are absent."""
        if not objs:
            return {}
        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=o, skip=False) for o in objs],
            propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=paths, all=False)],
        )
        collector = self.content.propertyCollector
        out: dict[str, dict[str, Any]] = {}
        result = collector.RetrievePropertiesEx([spec], pc.RetrieveOptions(maxObjects=500))
        while result is not None:
            for found in result.objects or []:
                out[found.obj._moId] = {p.name: p.val for p in found.propSet or []}
            if not result.token:
                break
            result = collector.ContinueRetrievePropertiesEx(token=result.token)
        return out

    def _entries(self, datacenter: str) -> list[tuple[str, Any]]:
        dcs = self.datacenters()
        if datacenter:
            dcs = [dc for dc in dcs if dc.name == datacenter]
            if not dcs:
                raise VSphereError(f"no datacenter {datacenter!r} in vCenter {self.login.host}")
        out: list[tuple[str, Any]] = []
        for dc in dcs:
            out.extend(self._walk_vms(dc.vmFolder, f"/{dc.name}/vm"))
        return out

    def vms(self, datacenter: str = "") -> list[tuple[str, Any]]:
        """``(inventory path, VM)`` of every VM of ``datacenter`` (all when empty)."""
        entries = self._entries(datacenter)
        names = self.properties([vm for _, vm in entries], ["name"])
        return [(f"{prefix}/{names[vm._moId]['name']}", vm) for prefix, vm in entries if vm._moId in names]

    VM_PROPERTIES = (
        "name",
        "runtime.powerState",
        "config.guestId",
        "config.hardware.memoryMB",
        "config.hardware.numCPU",
        "config.uuid",
        "config.changeTrackingEnabled",
        "config.hardware.device",
        "config.extraConfig",
    )

    @staticmethod
    def describe(moref: str, path: str, props: dict[str, Any]) -> dict[str, Any]:
        """A discovered VM from its properties (see :attr:`VM_PROPERTIES`)."""
        devices = list(props.get("config.hardware.device") or [])
        disks = disks_of(devices, props.get("config.extraConfig") or [])
        nics = []
        for d in devices:
            if isinstance(d, vim.vm.device.VirtualEthernetCard):
                b: Any = d.backing
                network = getattr(b, "deviceName", None)
                if network is None and getattr(b, "port", None) is not None:
                    network = b.port.portgroupKey
                nics.append(
                    {
                        "key": int(d.key),
                        "label": d.deviceInfo.label if d.deviceInfo is not None else "",
                        "mac_address": d.macAddress,
                        "network": network,
                        "adapter_type": type(d).__name__.rsplit(".", 1)[-1].removeprefix("Virtual").lower(),
                    }
                )

        def number(key: str) -> int | None:
            value = props.get(key)
            return int(value) if value is not None else None

        return {
            "id": moref,
            "name": props.get("name"),
            "path": path,
            "power_state": str(props.get("runtime.powerState")),
            "guest_os": props.get("config.guestId"),
            "memory_mb": number("config.hardware.memoryMB"),
            "num_cpu": number("config.hardware.numCPU"),
            "uuid": props.get("config.uuid"),
            "cbt_enabled": bool(props.get("config.changeTrackingEnabled")),
            "disks": [
                {
                    "id": d.disk_id,
                    "key": d.key,
                    "label": d.label,
                    "capacity_bytes": d.capacity,
                    "path": d.file_name,
                    "cbt_enabled": d.cbt_enabled,
                    "change_id": d.change_id,
                }
                for d in disks
            ],
            "networks": nics,
        }

    def discover(self, datacenter: str = "", name_filter: str = "") -> list[dict[str, Any]]:
        """VMs of ``datacenter`` (all when empty) whose name contains ``name_filter`` (any case):
        one folder walk, then the VMs' properties in one paged property-collector call."""
        entries = self._entries(datacenter)
        props = self.properties([vm for _, vm in entries], list(self.VM_PROPERTIES))
        wanted = name_filter.lower()
        out = []
        for prefix, vm in entries:
            p = props.get(vm._moId)
            if p is None or wanted not in str(p.get("name", "")).lower():
                continue
            out.append(self.describe(vm._moId, f"{prefix}/{p['name']}", p))
        return out

    def find_vm(self, path: str) -> Any:
        """The VM at inventory path ``/DC/vm/[folders/]NAME``."""
        vm = self.content.searchIndex.FindByInventoryPath(path.strip("/"))
        if isinstance(vm, vim.VirtualMachine):
            return vm
        for p, candidate in self.vms(path.strip("/").split("/", 1)[0]):
            if p == "/" + path.strip("/"):
                return candidate
        raise VSphereError(f"no VM at {path!r}")

    # -- power ---------------------------------------------------------------------------------------

    POWER_PROPERTIES = ("name", "runtime.powerState", "guest.toolsRunningStatus")

    def vm_by_id(self, vm_id: str) -> Any:
        """The VM whose managed object id is ``vm_id`` (discovery's ``id``, e.g. ``vm-143``);
        :class:`VmNotFound` when vCenter has none (or the id names another kind of object)."""
        vm = vim.VirtualMachine(vm_id, self.si._stub)
        self.vm_power(vm)
        return vm

    def vm_power(self, vm: Any) -> VmPower:
        """The VM's power state and whether VMware Tools run in its guest (one property read)."""
        try:
            props = self.properties([vm], list(self.POWER_PROPERTIES)).get(vm._moId)
        except (vmodl.fault.ManagedObjectNotFound, vmodl.fault.InvalidArgument, vmodl.fault.InvalidType) as e:
            raise VmNotFound(vm._moId, self.login.host) from e
        except vmodl.MethodFault as e:
            raise VSphereError(f"reading the power state of {vm._moId} failed: {fault_message(e)}") from e
        if props is None or "runtime.powerState" not in props:
            raise VmNotFound(vm._moId, self.login.host)
        return VmPower(
            vm_id=vm._moId,
            name=str(props.get("name", "")),
            power_state=str(props["runtime.powerState"]),
            tools_running=str(props.get("guest.toolsRunningStatus")) == "guestToolsRunning",
        )

    def shutdown_guest(self, vm: Any) -> None:
        """Ask the guest to shut down (``ShutdownGuest``, through VMware Tools). vCenter answers at
        once; the guest powers off when it is done: poll :meth:`vm_power`."""
        try:
            vm.ShutdownGuest()
        except vmodl.MethodFault as e:
            raise VSphereError(f"guest shutdown of {vm._moId} refused: {fault_message(e)}") from e
        log.info("guest shutdown requested", extra={"action": "guest_shutdown", "vm": vm._moId})

    def power_off_vm(self, vm: Any) -> bool:
        """Power the VM off hard (``PowerOffVM_Task``). False: it was off already (also when it went
        off meanwhile and vCenter refused the task for that)."""
        return self._power_task(vm, "PowerOffVM_Task", "poweredOff")

    def power_on_vm(self, vm: Any) -> bool:
        """Power the VM on (``PowerOnVM_Task``; a suspended VM resumes). False: it was on already."""
        return self._power_task(vm, "PowerOnVM_Task", "poweredOn")

    def _power_task(self, vm: Any, method: str, wanted: str) -> bool:
        if self.vm_power(vm).power_state == wanted:
            return False
        try:
            self._wait(getattr(vm, method)(), f"{method} of {vm._moId}")
        except (VSphereError, vmodl.MethodFault) as e:
            # InvalidPowerState: someone else got there first. Any other failure stands.
            if self.vm_power(vm).power_state == wanted:
                return False
            if isinstance(e, VSphereError):
                raise
            raise VSphereError(f"{method} of {vm._moId} failed: {fault_message(e)}") from e
        log.info("VM %s", wanted, extra={"action": method, "vm": vm._moId})
        return True

    # -- CBT -----------------------------------------------------------------------------------------

    def live_disks(self, vm: Any) -> list[DiskInfo]:
        return disks_of(vm.config.hardware.device, vm.config.extraConfig)

    def ensure_cbt(self, vm: Any, *, stun_name: str) -> bool:
        """Turn CBT on for the VM and each of its disks; stun a running VM so that it takes effect.
        Returns whether anything had to change."""
        disks = self.live_disks(vm)
        vm_on = bool(vm.config.changeTrackingEnabled)
        off = [d for d in disks if not d.cbt_enabled]
        if vm_on and not off:
            return False
        extra = {o.key: str(o.value) for o in vm.config.extraConfig or []}
        spec = vim.vm.ConfigSpec(
            changeTrackingEnabled=True,
            extraConfig=[
                vim.option.OptionValue(key=d.ctk_key, value="TRUE")
                for d in disks
                if extra.get(d.ctk_key, "").upper() != "TRUE"
            ],
        )
        log.info(
            "enabling CBT", extra={"action": "cbt_enable", "vm": vm.name, "disks": [d.disk_id for d in off]}
        )
        self._wait(vm.ReconfigVM_Task(spec), f"enabling CBT on {vm.name}")
        if str(vm.runtime.powerState) == "poweredOn" and any(
            d.change_id is None for d in self.live_disks(vm)
        ):
            # CBT switched on for a running VM only starts at its next stun.
            snap = self.create_snapshot(vm, stun_name, "VMA: stun to activate change tracking")
            self.remove_snapshot(snap)
        still_off = [d.disk_id for d in self.live_disks(vm) if not d.cbt_enabled]
        if still_off:
            raise VSphereError(f"CBT is still off on {vm.name} disks {', '.join(still_off)}")
        return True

    # -- snapshots -----------------------------------------------------------------------------------

    def _wait(self, task: Any, what: str) -> Any:
        """Wait for ``task`` by polling its state (each read a short request) for at most
        ``DEADLINES.task`` seconds."""
        deadline = time.monotonic() + DEADLINES.task
        while True:
            info = task.info
            state = str(info.state)
            if state == "success":
                return info.result
            if state == "error":
                raise VSphereError(f"{what} failed: {fault_message(info.error)}")
            if time.monotonic() > deadline:
                raise VSphereTimeout(f"{what}: the vCenter task did not end within {DEADLINES.task:.0f} s")
            time.sleep(DEADLINES.task_poll)

    def create_snapshot(self, vm: Any, name: str, description: str) -> SnapshotRef:
        snap = self._wait(
            vm.CreateSnapshot_Task(name=name, description=description, memory=False, quiesce=False),
            f"snapshot of {vm.name}",
        )
        log.info(
            "snapshot created", extra={"action": "snapshot_create", "vm": vm.name, "snapshot": snap._moId}
        )
        return SnapshotRef(vm._moId, snap._moId, name)

    def snapshot_obj(self, ref: SnapshotRef) -> Any:
        return vim.vm.Snapshot(ref.moref, self.si._stub)

    def property(self, obj: Any, name: str) -> Any:
        """One property through the property collector; None when unset. (Reading an unset
        property as an attribute makes pyvmomi call ``Fetch``, which some servers, the govmomi
        simulator among them, answer with an error instead of nothing.)"""
        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=obj, skip=False)],
            propSet=[pc.PropertySpec(type=type(obj), pathSet=[name], all=False)],
        )
        result = self.content.propertyCollector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
        for found in result.objects if result is not None else []:
            for prop in found.propSet or []:
                if prop.name == name:
                    return prop.val
        return None

    def snapshot_tree(self, vm: Any) -> list[Any]:
        """Every snapshot of the VM (tree nodes with ``name`` and ``snapshot``), flattened."""
        info = self.property(vm, "snapshot")
        return _flatten(info.rootSnapshotList if info is not None else [])

    def snapshot_exists(self, ref: SnapshotRef) -> bool:
        vm = vim.VirtualMachine(ref.vm_moref, self.si._stub)
        try:
            tree = self.snapshot_tree(vm)
        except vmodl.fault.ManagedObjectNotFound:
            return False
        return ref.moref in {s.snapshot._moId for s in tree}

    def snapshot_disks(self, ref: SnapshotRef) -> list[DiskInfo]:
        snap = self.snapshot_obj(ref)
        config = snap.config
        return disks_of(config.hardware.device, config.extraConfig)

    def remove_snapshot(self, ref: SnapshotRef) -> bool:
        """Remove the snapshot ``ref`` (only that one, never its children). False: it was gone."""
        if not self.snapshot_exists(ref):
            return False
        self._wait(
            self.snapshot_obj(ref).RemoveSnapshot_Task(removeChildren=False),
            f"removing snapshot {ref.moref}",
        )
        log.info("snapshot removed", extra={"action": "snapshot_remove", "snapshot": ref.moref})
        return True

    def snapshots_named(self, vm: Any, name: str) -> list[SnapshotRef]:
        return [
            SnapshotRef(vm._moId, s.snapshot._moId, s.name) for s in self.snapshot_tree(vm) if s.name == name
        ]

    # -- changed areas ---------------------------------------------------------------------------------

    def changed_areas(self, ref: SnapshotRef, disk: DiskInfo, change_id: str) -> list[tuple[int, int]]:
        """The areas of ``disk`` changed since ``change_id`` (``"*"``: all allocated areas) as of the
        snapshot, over the whole disk. Raises :class:`CbtResetError` when vCenter refuses the
        change ID as stale (another CBT epoch)."""
        vm = vim.VirtualMachine(ref.vm_moref, self.si._stub)
        snap = self.snapshot_obj(ref)

        def query(offset: int) -> ChangeInfo:
            info: ChangeInfo = vm.QueryChangedDiskAreas(
                snapshot=snap, deviceKey=disk.key, startOffset=offset, changeId=change_id
            )
            return info

        try:
            return collect_changed_areas(query, disk.capacity)
        except vim.fault.FileFault as e:
            if change_id != "*":
                raise CbtResetError(
                    f"vCenter refused change ID {change_id!r} for {disk.disk_id}: {fault_message(e)}"
                ) from e
            raise VSphereError(f"QueryChangedDiskAreas failed for {disk.disk_id}: {fault_message(e)}") from e
        except vmodl.MethodFault as e:
            raise VSphereError(f"QueryChangedDiskAreas failed for {disk.disk_id}: {fault_message(e)}") from e


def fault_message(e: BaseException) -> str:
    return str(getattr(e, "msg", None) or type(e).__name__)


def _flatten(tree: Iterable[Any]) -> list[Any]:
    out = []
    for node in tree or []:
        out.append(node)
        out.extend(_flatten(node.childSnapshotList))
    return out
