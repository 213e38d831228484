"""OMA configuration: command-line flags over environment variables over defaults.

| setting | flag | environment | default |
| --- | --- | --- | --- |
| listen host | ``--host`` | ``OMA_HOST`` | ``0.0.0.0`` |
| listen port | ``--port`` | ``OMA_PORT`` | ``8082`` (``0``: pick a free port) |
| data directory | ``--data-dir`` | ``OMA_DATA_DIR`` | ``/var/lib/oma`` |
| database | | ``DATABASE_URL`` | embedded PostgreSQL in ``<data-dir>/pgdata`` |
| VMA API URL | ``--vma-url`` | ``OMA_VMA_URL`` | ``http://localhost:9081`` |
| VMA request timeout (s) | | ``OMA_VMA_TIMEOUT`` | ``10`` |
| the enrolled VMA's secret (signs requests to it) | | ``OMA_VMA_SECRET_FILE`` | none: the VMA answers 401 |
| credentials key file | | ``OMA_SECRET_KEY_FILE`` | ``<data-dir>/secrets/credentials.key`` |
| first admin | | ``OMA_ADMIN_USERNAME`` + ``OMA_ADMIN_PASSWORD_FILE`` (or ``_PASSWORD``) | none |
| token lifetime (s) | | ``OMA_TOKEN_TTL`` | ``86400`` |
| pairing code lifetime (s) | | ``OMA_PAIRING_CODE_TTL`` | ``600`` |
| log level | ``--log-level`` | ``OMA_LOG_LEVEL`` | ``info`` |
| pool size (per worker) | | ``OMA_DB_POOL_SIZE`` | ``30`` |
| worker processes | ``--workers`` | ``OMA_WORKERS`` | ``1`` |
| run the replication engine | | ``OMA_REPLICATION_ENGINE`` (``0``/``1``) | ``1`` |
| host the VMA reaches target exports at | | ``OMA_NBD_HOST`` | ``127.0.0.1`` (the tunnel's end) |
| jobs driven at once per process | | ``OMA_MAX_ACTIVE_JOBS`` | ``8`` |
| seconds without any VMA answer before a job fails | | ``OMA_VMA_LOST_TIMEOUT`` | ``300`` |
| run the backup services (backups, copies, retention) | | ``OMA_BACKUP_ENGINE`` (``0``/``1``) | ``1`` |
| backups driven at once per process | | ``OMA_MAX_ACTIVE_BACKUPS`` | ``4`` |
| NFS/CIFS mount points without ``mount_point`` | | ``OMA_MOUNT_ROOT`` | ``<data-dir>/mounts`` |
| seconds between retention runs | | ``OMA_RETENTION_INTERVAL`` | ``3600`` |
| idle seconds before a file-restore mount expires | | ``OMA_RESTORE_IDLE_TIMEOUT`` | ``3600`` |
| seconds between restore cleanup runs | | ``OMA_RESTORE_CLEANUP_INTERVAL`` | ``60`` |
| file-restore mounts open at once | | ``OMA_MAX_RESTORE_MOUNTS`` | ``8`` |
| where full restores may write (``:``-separated) | | ``OMA_RESTORE_ROOTS`` | none: NBD only |
| seconds a claimed job's lease lasts without renewal | | ``OMA_JOB_LEASE_TTL`` | ``60`` |
| seconds a lost database connection is retried | | ``OMA_DB_RETRY_DEADLINE`` | ``120`` |
| where the OMA VM's block devices appear (``disk/by-id/...``) | | ``OMA_DEVICE_ROOT`` | ``/dev`` |
| seconds one CloudStack API request may take | | ``OMA_CLOUDSTACK_TIMEOUT`` | ``30`` |
| seconds a CloudStack asynchronous job may take | | ``OMA_CLOUDSTACK_JOB_TIMEOUT`` | ``300`` |
| seconds an attached volume's device may take to appear | | ``OMA_DEVICE_WAIT_TIMEOUT`` | ``60`` |
| the OMA VM's MAC addresses (``,``-separated) | | ``OMA_VM_MACS`` | none: read from the OS |
| the OMA VM's IP addresses (``,``-separated) | | ``OMA_VM_IPS`` | none: read from the OS |
| NBD export ports (``first-last``; the tunnel forwards them) | | ``OMA_NBD_PORTS`` | none: any free port |
| the tunnel user's ``authorized_keys`` | | ``OMA_TUNNEL_AUTHORIZED_KEYS`` | none: no tunnel |
| the tunnel's unprivileged user | | ``OMA_TUNNEL_USER`` | ``oma-tunnel`` |
| the sshd host VMAs dial | | ``OMA_TUNNEL_SSH_HOST`` | the OMA URL's host |
| the sshd port VMAs dial | | ``OMA_TUNNEL_SSH_PORT`` | ``22`` |
| sshd's public host key | | ``OMA_TUNNEL_HOST_KEY_FILE`` | ``/etc/ssh/ssh_host_ed25519_key.pub`` |
| sshd's log (ends a revoked VMA's session) | | ``OMA_TUNNEL_SSHD_LOG`` | none |
| the OMA API port VMAs reach through the tunnel | | ``OMA_TUNNEL_API_PORT`` | the listen port |
| who reads ``/metrics`` without a token (docs/oma.md) | | ``OMA_METRICS_PUBLIC`` | ``loopback`` |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pyapp.config import ConfigError, env_float, env_int, env_path, env_str, read_secret_file

DEFAULT_PORT = 8082
DEFAULT_VMA_URL = "http://localhost:9081"


@dataclass(frozen=True)
class OmaConfig:
    data_dir: Path
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    database_url: str | None = None
    vma_url: str = DEFAULT_VMA_URL
    vma_timeout: float = 10.0
    #: The enrolled VMA's secret, with which every request to the VMA is signed (docs/vma.md).
    vma_secret_file: Path | None = None
    secret_key_file: Path | None = None
    admin_username: str | None = None
    admin_password: str | None = None
    token_ttl_seconds: int = 24 * 3600
    pairing_code_ttl_seconds: int = 600
    log_level: str = "info"
    db_pool_size: int = 30
    workers: int = 1
    max_body_bytes: int = 1024 * 1024
    #: The replication engine (oma/replication/engine.py): off for processes that only serve the API.
    run_replications: bool = True
    nbd_host: str = "127.0.0.1"
    max_active_jobs: int = 8
    engine_poll_interval: float = 1.0
    vma_lost_timeout: float = 300.0
    #: The backup services (oma/backups): off for processes that only serve the API.
    run_backups: bool = True
    max_active_backups: int = 4
    mount_root: Path | None = None
    retention_interval: float = 3600.0
    restore_idle_timeout: float = 3600.0
    restore_cleanup_interval: float = 60.0
    max_restore_mounts: int = 8
    restore_roots: tuple[Path, ...] = ()
    #: A claimed job's lease: renewed every third of it; once expired, another worker takes over.
    job_lease_ttl: float = 60.0
    #: How long a database call keeps retrying a lost connection (backoff) before it fails.
    db_retry_deadline: float = 120.0
    #: Where the OMA VM's block devices appear: an attached CloudStack volume is
    #: ``<device_root>/disk/by-id/virtio-<first 20 hex digits of its UUID>`` (oma/cloudstack).
    device_root: Path = Path("/dev")
    #: One CloudStack API request (connect and answer), and one asynchronous job, at most.
    cloudstack_timeout: float = 30.0
    cloudstack_job_timeout: float = 300.0
    #: How long an attached volume's device may take to appear (or a detached one to go).
    device_wait_timeout: float = 60.0
    #: The addresses the OMA VM is found by in CloudStack; empty: this host's, read from the OS.
    oma_vm_macs: tuple[str, ...] = ()
    oma_vm_ips: tuple[str, ...] = ()
    #: The ports NBD exports are served on (the tunnel forwards each); empty: any free port.
    nbd_ports: tuple[int, ...] = ()
    #: The tunnel (docs/tunnel.md): approval installs the VMA's key in this file; None: no tunnel.
    tunnel_authorized_keys: Path | None = None
    tunnel_user: str = "oma-tunnel"
    tunnel_ssh_host: str = ""
    tunnel_ssh_port: int = 22
    tunnel_host_key_file: Path = Path("/etc/ssh/ssh_host_ed25519_key.pub")
    tunnel_sshd_log: Path | None = None
    tunnel_api_port: int | None = None
    #: How a failed-over guest is known to answer (oma/failover/guest.py: running, lab-console),
    #: and how long its start may take until then.
    failover_guest_check: str = "running"
    failover_boot_timeout: float = 300.0
    #: ``/metrics`` without a token: ``loopback`` (from this host), ``public`` (anyone), ``token``
    #: (nobody: a viewer's token is needed). docs/oma.md, "Metrics".
    metrics_access: str = "loopback"

    @property
    def key_file(self) -> Path:
        return self.secret_key_file or self.data_dir / "secrets" / "credentials.key"

    @property
    def volumes_dir(self) -> Path:
        return self.data_dir / "volumes"

    @property
    def mounts_dir(self) -> Path:
        """Where NFS and CIFS repositories without their own ``mount_point`` are mounted."""
        return self.mount_root or self.data_dir / "mounts"

    @property
    def export_records_dir(self) -> Path:
        """Durable records of the running ``qemu-nbd`` exports (see :mod:`pyapp.nbd_export`)."""
        return self.data_dir / "run" / "exports"

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    def with_overrides(self, **changes: object) -> OmaConfig:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]

    @classmethod
    def from_env(cls) -> OmaConfig:
        admin_password = env_str("OMA_ADMIN_PASSWORD")
        password_file = env_path("OMA_ADMIN_PASSWORD_FILE")
        if password_file is not None:
            admin_password = read_secret_file(password_file)
        admin_username = env_str("OMA_ADMIN_USERNAME")
        if (admin_username is None) != (admin_password is None):
            raise ConfigError("OMA_ADMIN_USERNAME and OMA_ADMIN_PASSWORD(_FILE) go together")
        if admin_username is not None and admin_username.startswith("vma-"):
            raise ConfigError("user names starting with 'vma-' are reserved for enrolled VMAs")
        return cls(
            data_dir=env_path("OMA_DATA_DIR", Path("/var/lib/oma")) or Path("/var/lib/oma"),
            host=env_str("OMA_HOST", "0.0.0.0") or "0.0.0.0",
            port=env_int("OMA_PORT", DEFAULT_PORT, minimum=0),
            database_url=env_str("DATABASE_URL"),
            vma_url=(env_str("OMA_VMA_URL", DEFAULT_VMA_URL) or DEFAULT_VMA_URL).rstrip("/"),
            vma_timeout=env_float("OMA_VMA_TIMEOUT", 10.0),
            vma_secret_file=env_path("OMA_VMA_SECRET_FILE"),
            secret_key_file=env_path("OMA_SECRET_KEY_FILE"),
            admin_username=admin_username,
            admin_password=admin_password,
            token_ttl_seconds=env_int("OMA_TOKEN_TTL", 24 * 3600, minimum=1),
            pairing_code_ttl_seconds=env_int("OMA_PAIRING_CODE_TTL", 600, minimum=1),
            log_level=env_str("OMA_LOG_LEVEL", "info") or "info",
            db_pool_size=env_int("OMA_DB_POOL_SIZE", 30, minimum=1),
            workers=env_int("OMA_WORKERS", 1, minimum=1),
            run_replications=env_int("OMA_REPLICATION_ENGINE", 1, minimum=0) != 0,
            nbd_host=env_str("OMA_NBD_HOST", "127.0.0.1") or "127.0.0.1",
            max_active_jobs=env_int("OMA_MAX_ACTIVE_JOBS", 8, minimum=1),
            vma_lost_timeout=env_float("OMA_VMA_LOST_TIMEOUT", 300.0),
            run_backups=env_int("OMA_BACKUP_ENGINE", 1, minimum=0) != 0,
            max_active_backups=env_int("OMA_MAX_ACTIVE_BACKUPS", 4, minimum=1),
            mount_root=env_path("OMA_MOUNT_ROOT"),
            retention_interval=env_float("OMA_RETENTION_INTERVAL", 3600.0),
            restore_idle_timeout=env_float("OMA_RESTORE_IDLE_TIMEOUT", 3600.0),
            restore_cleanup_interval=env_float("OMA_RESTORE_CLEANUP_INTERVAL", 60.0),
            max_restore_mounts=env_int("OMA_MAX_RESTORE_MOUNTS", 8, minimum=1),
            restore_roots=tuple(Path(p) for p in (env_str("OMA_RESTORE_ROOTS") or "").split(":") if p),
            job_lease_ttl=env_float("OMA_JOB_LEASE_TTL", 60.0),
            db_retry_deadline=env_float("OMA_DB_RETRY_DEADLINE", 120.0),
            device_root=env_path("OMA_DEVICE_ROOT", Path("/dev")) or Path("/dev"),
            cloudstack_timeout=env_float("OMA_CLOUDSTACK_TIMEOUT", 30.0),
            cloudstack_job_timeout=env_float("OMA_CLOUDSTACK_JOB_TIMEOUT", 300.0),
            device_wait_timeout=env_float("OMA_DEVICE_WAIT_TIMEOUT", 60.0),
            oma_vm_macs=_env_list("OMA_VM_MACS"),
            oma_vm_ips=_env_list("OMA_VM_IPS"),
            nbd_ports=port_range(env_str("OMA_NBD_PORTS", "") or ""),
            tunnel_authorized_keys=env_path("OMA_TUNNEL_AUTHORIZED_KEYS"),
            tunnel_user=env_str("OMA_TUNNEL_USER", "oma-tunnel") or "oma-tunnel",
            tunnel_ssh_host=env_str("OMA_TUNNEL_SSH_HOST", "") or "",
            tunnel_ssh_port=env_int("OMA_TUNNEL_SSH_PORT", 22, minimum=1),
            tunnel_host_key_file=env_path(
                "OMA_TUNNEL_HOST_KEY_FILE", Path("/etc/ssh/ssh_host_ed25519_key.pub")
            )
            or Path("/etc/ssh/ssh_host_ed25519_key.pub"),
            tunnel_sshd_log=env_path("OMA_TUNNEL_SSHD_LOG"),
            tunnel_api_port=env_int("OMA_TUNNEL_API_PORT", 0, minimum=0) or None,
            failover_guest_check=env_str("OMA_FAILOVER_GUEST_CHECK", "running") or "running",
            failover_boot_timeout=env_float("OMA_FAILOVER_BOOT_TIMEOUT", 300.0),
            metrics_access=_metrics_access(env_str("OMA_METRICS_PUBLIC", "loopback") or "loopback"),
        )


def port_range(text: str) -> tuple[int, ...]:
    """``"10809-10840"`` (or one port) as the ports it names; empty: none."""
    if not text.strip():
        return ()
    first, _, last = text.strip().partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        raise ConfigError(f"a port range is FIRST-LAST, got {text!r}") from None
    if not 0 < lo <= hi < 65536 or hi - lo >= 1024:
        raise ConfigError(f"a port range is 1 to 1024 ports within 1-65535, got {text!r}")
    return tuple(range(lo, hi + 1))


def _metrics_access(value: str) -> str:
    access = {"loopback": "loopback", "1": "public", "true": "public", "yes": "public",
              "0": "token", "false": "token", "no": "token"}.get(value.strip().lower())  # fmt: skip
    if access is None:
        raise ConfigError(f"OMA_METRICS_PUBLIC must be loopback, 1 or 0, got {value!r}")
    return access


def _env_list(name: str) -> tuple[str, ...]:
    """A ``,``-separated list from the environment (empty entries dropped)."""
    return tuple(part.strip() for part in (env_str(name) or "").split(",") if part.strip())
