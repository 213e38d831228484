"""Building and running the lab simulator (``lab/vcsim``, Go).

The binary is built with Debian's Go and govmomi (``GO111MODULE=off GOPATH=/usr/share/gocode``)
once per source state: it is cached under ``<cache dir>/lab-vcsim-<hash>``, the hash covering the
Go sources and ``go version``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GOPATH = "/usr/share/gocode"
SOURCE_DIR = Path(__file__).resolve().parent / "vcsim"


class LabError(RuntimeError):
    """The lab could not be built or started."""


def default_cache_dir() -> Path:
    env = os.environ.get("MOVER_LAB_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vmware-cloudstack-mover" / "lab"


def go_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(GO111MODULE="off", GOPATH=GOPATH, CGO_ENABLED="0")
    env.setdefault("GOCACHE", str(cache_dir / "go-build"))
    return env


def source_hash(source_dir: Path = SOURCE_DIR) -> str:
    h = hashlib.sha256()
    for p in sorted(source_dir.glob("*.go")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    go = shutil.which("go")
    if go is None:
        raise LabError("the Go toolchain (golang-go) is not installed")
    h.update(subprocess.run([go, "version"], capture_output=True, check=True).stdout)
    return h.hexdigest()[:16]


def build_vcsim(cache_dir: Path | None = None, source_dir: Path = SOURCE_DIR) -> Path:
    """The path of the simulator binary for the current sources, building it if needed."""
    cache = cache_dir or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    binary = cache / f"lab-vcsim-{source_hash(source_dir)}"
    if binary.exists():
        return binary
    with (cache / "build.lock").open("w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if binary.exists():  # built by another process meanwhile
            return binary
        fd, tmp = tempfile.mkstemp(prefix=".lab-vcsim-", dir=cache)
        os.close(fd)
        proc = subprocess.run(
            ["go", "build", "-o", tmp, "."],
            cwd=source_dir,
            env=go_env(cache),
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            os.unlink(tmp)
            raise LabError(f"go build of {source_dir} failed:\n{proc.stderr}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, binary)
    return binary


@dataclass(frozen=True)
class Ready:
    """What the simulator announces once it serves."""

    url: str
    username: str
    password: str
    datastores: dict[str, Path]
    pid: int
    #: PEM file of the simulator's self-signed certificate (HTTPS, ``tls=True``), else None.
    certificate: Path | None = None

    @classmethod
    def parse(cls, line: bytes) -> Ready:
        try:
            d: dict[str, Any] = json.loads(line)
        except ValueError as e:
            raise LabError(f"unexpected output from the simulator: {line!r}") from e
        if d.get("event") != "ready":
            raise LabError(f"unexpected output from the simulator: {line!r}")
        return cls(
            d["url"],
            d["username"],
            d["password"],
            {k: Path(v) for k, v in d["datastores"].items()},
            int(d["pid"]),
            Path(d["certificate"]) if d.get("certificate") else None,
        )


def vcsim_command(
    binary: Path,
    lab_dir: Path,
    *,
    port: int = 0,
    datastores: list[str] | None = None,
    qcda_window: int = 0,
    cbt_block: int = 512,
    username: str = "user",
    password: str = "pass",
    tls: bool = False,
) -> list[str]:
    return [
        str(binary),
        "-dir",
        str(lab_dir),
        "-listen",
        f"127.0.0.1:{port}",
        "-datastore",
        ",".join(datastores or ["LocalDS_0"]),
        "-qcda-window",
        str(qcda_window),
        "-cbt-block",
        str(cbt_block),
        "-username",
        username,
        "-password",
        password,
        *(["-tls"] if tls else []),
    ]
