"""The VMA's configuration: a JSON file (``vma-api-server --config FILE``) over these defaults.

Nothing here is a secret except the OMA enrollment secret, which is read from ``oma_secret_file``
(never from argv). See ``docs/vma.md`` for every key.

The export settings (``export_listen``, ``export_host``, ``export_timeout``) also read the
environment (``VMA_EXPORT_LISTEN``, ``VMA_EXPORT_HOST``, ``VMA_EXPORT_TIMEOUT``), because where the
OMA reaches the exports depends on how the appliance was deployed (tunnel or not), not on the
configuration file it ships with: the environment sets the default, a key in the file wins.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pyapp.config import ConfigError, env_float, env_str

SourceKind = Literal["file", "vddk"]

#: Addresses that mean "every interface": a client cannot connect to them, so they are never
#: advertised in an export's URI.
WILDCARD_ADDRESSES = ("0.0.0.0",)


@dataclass
class VmaConfig:
    host: str = "127.0.0.1"
    port: int = 8081
    log_level: str = "info"
    #: Where job artifacts live (password file, nbdkit logs): ``<work_dir>/<job_id>/``.
    work_dir: Path = field(default_factory=lambda: Path("/var/lib/vma"))
    #: Where the nbdkit sources' Unix sockets live (paths must stay under 108 bytes); unset: a
    #: private temporary directory made at start and removed at shutdown.
    socket_dir: Path | None = None

    # -- OMA -------------------------------------------------------------------------------------
    oma_url: str = "http://127.0.0.1:8082"
    #: The enrolled appliance id (``vma-...``) and its secret, as issued by the OMA's enrollment.
    appliance_id: str = ""
    oma_secret_file: Path | None = None
    oma_timeout: float = 30.0
    #: Renew the token this many seconds before it expires.
    token_renew_margin: float = 300.0
    #: Exponential backoff while the OMA is unreachable: first delay, cap, and give-up deadline.
    oma_backoff_initial: float = 1.0
    oma_backoff_max: float = 60.0
    oma_unreachable_deadline: float = 600.0

    # -- the tunnel to the OMA (docs/tunnel.md; written by ``vma-enroll``) -----------------------
    #: The OMA's sshd; empty: no tunnel (the OMA reaches this VMA directly).
    tunnel_host: str = ""
    tunnel_port: int = 22
    tunnel_user: str = "oma-tunnel"
    #: This VMA's ed25519 private key (0600) and the known_hosts file pinning the OMA's host key.
    tunnel_key_file: Path | None = None
    tunnel_known_hosts: Path | None = None
    #: The OMA's loopback port this VMA's API is forwarded to (the OMA calls the VMA there).
    tunnel_remote_port: int = 9081
    #: The OMA's loopback ports this VMA reaches on ``tunnel_local_address`` at the same port
    #: numbers: the OMA's API and its NBD export ports.
    tunnel_forward_ports: list[int] = field(default_factory=list)
    #: Where those forwards listen here (a loopback address).
    tunnel_local_address: str = "127.0.0.1"
    #: The cipher (docs/tunnel.md, bench/RESULTS.md: chosen for speed).
    tunnel_cipher: str = "aes128-gcm@openssh.com"
    #: Seconds between keep-alives; the tunnel is dropped after three go unanswered.
    tunnel_keepalive: float = 15.0
    #: Reconnection backoff: first delay and cap (seconds).
    tunnel_backoff_initial: float = 1.0
    tunnel_backoff_max: float = 60.0
    ssh: str = "ssh"

    # -- vCenter ---------------------------------------------------------------------------------
    #: vCenter's certificate is checked as each credential's ``tls_mode`` says (sent by the OMA;
    #: ``verify`` unless given). True skips every check, for every vCenter (a WARNING each connect).
    vcenter_insecure: bool = False
    #: Extra CA certificates (PEM) that ``verify`` trusts besides the system's.
    vcenter_ca_file: Path | None = None
    vsphere_threads: int = 8
    #: Deadline of one vSphere call (and of each HTTP request of a session), in seconds.
    vsphere_call_timeout: float = 60.0
    #: Deadline of waiting for a vCenter task (snapshot create/remove, CBT reconfiguration).
    vsphere_task_timeout: float = 1800.0
    #: Seconds between two passes removing what jobs of a previous run (or failed removals)
    #: left in vCenter and in the work directory; the first pass runs at start.
    recovery_interval: float = 60.0

    # -- disk sources ----------------------------------------------------------------------------
    #: ``vddk``: nbdkit's vddk plugin against the snapshot (production); ``file``: nbdkit's file
    #: plugin over the snapshot disk's raw image found through ``datastore_roots`` (lab, tests).
    source: SourceKind = "vddk"
    datastore_roots: dict[str, Path] = field(default_factory=dict)
    vddk_libdir: Path = field(default_factory=lambda: Path("/opt/vmware-vix-disklib-distrib"))
    vddk_thumbprint: str = ""
    vddk_transports: str = "nbd:nbdssl:hotadd"
    nbdkit: str = "nbdkit"

    # -- copying ---------------------------------------------------------------------------------
    #: Disks copied at once in this VMA (over all jobs); VMs of one job are started under it too.
    max_parallel_disks: int = 4
    mover_connections: int = 4
    #: Requests in flight per connection and their size. Cancelling a copy (cleanup of a running
    #: job) lets the requests in flight finish: connections x requests x size bounds that wait.
    mover_requests: int = 16
    mover_request_size: int = 1 << 20
    #: How long the mover retries a lost NBD connection before the job fails.
    reconnect_timeout: float = 30.0
    #: Store the change ID of a pass whose target cannot be made durable (an NBD server without
    #: flush). Off: such a pass fails, because its base could hold bytes the target never kept.
    allow_non_durable_targets: bool = False
    #: Seconds between replication record updates sent to the OMA while copying.
    progress_report_interval: float = 5.0
    #: How long a failed job keeps trying to tell the OMA before giving up (the OMA may be down).
    final_report_timeout: float = 30.0

    # -- export jobs (backups: the OMA pulls the snapshot's disks) ---------------------------------
    #: The IPv4 address the export jobs' nbdkit sources listen on (loopback: the OMA comes
    #: through the tunnel).
    export_listen: str = field(default_factory=lambda: env_str("VMA_EXPORT_LISTEN", "127.0.0.1") or "")
    #: The host named in the exports' URIs; empty: ``export_listen``.
    export_host: str = field(default_factory=lambda: env_str("VMA_EXPORT_HOST", "") or "")
    #: Seconds an export job keeps its sources and snapshot when nobody releases it.
    export_timeout: float = field(default_factory=lambda: env_float("VMA_EXPORT_TIMEOUT", 3600.0))

    # -- defaults set by PUT /api/v1/config (the seed's dynamic allocation) ------------------------
    nbd_host: str = "127.0.0.1"
    nbd_port: int | None = None
    export_name: str | None = None
    target_device: str | None = None

    def __post_init__(self) -> None:
        try:
            listen = ipaddress.ip_address(self.export_listen)
        except ValueError:
            raise ConfigError(f"export_listen must be an IPv4 address, got {self.export_listen!r}") from None
        if listen.version != 4:
            raise ConfigError(f"export_listen must be an IPv4 address, got {self.export_listen!r}")
        if self.export_listen in WILDCARD_ADDRESSES and not self.export_host:
            raise ConfigError(
                f"export_listen {self.export_listen} listens everywhere: set export_host"
                " (VMA_EXPORT_HOST) to the address the OMA reaches this VMA at"
            )
        for name in ("vsphere_call_timeout", "vsphere_task_timeout", "recovery_interval"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")
        if self.tunnel_host and (self.tunnel_key_file is None or self.tunnel_known_hosts is None):
            raise ConfigError("a tunnel (tunnel_host) needs tunnel_key_file and tunnel_known_hosts")
        if not self.export_timeout > 0:
            raise ConfigError(
                f"export_timeout must be a positive number of seconds, got {self.export_timeout}"
            )

    @property
    def export_uri_host(self) -> str:
        """The host the exports' URIs name: ``export_host``, else the listening address."""
        return self.export_host or self.export_listen

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> VmaConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        values = dict(data)
        for key in (
            "work_dir",
            "socket_dir",
            "oma_secret_file",
            "vddk_libdir",
            "tunnel_key_file",
            "tunnel_known_hosts",
        ):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        if "datastore_roots" in values:
            values["datastore_roots"] = {str(k): Path(v) for k, v in values["datastore_roots"].items()}
        if values.get("source", "vddk") not in ("file", "vddk"):
            raise ValueError("source must be 'file' or 'vddk'")
        return cls(**values)

    @classmethod
    def load(cls, path: Path) -> VmaConfig:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the configuration must be a JSON object")
        return cls.from_mapping(data)

    def oma_secret(self) -> str:
        if self.oma_secret_file is None:
            return ""
        return self.oma_secret_file.read_text().strip()
