"""Type stubs of the Rust extension (checked against the module by ``mypy.stubtest``)."""

from os import PathLike
from typing import final

__all__ = [
    "CancelledError",
    "ConnectError",
    "Copy",
    "CopyProgress",
    "FormatError",
    "InvalidEndpointError",
    "InvalidPlanError",
    "MoverError",
    "ProtocolError",
    "SourceReadError",
    "TargetWriteError",
    "__version__",
]

__version__: str

class MoverError(Exception):
    offset: int | None
    length: int | None
    code: int | None

class InvalidEndpointError(MoverError): ...
class ConnectError(MoverError): ...
class ProtocolError(MoverError): ...
class SourceReadError(MoverError): ...
class TargetWriteError(MoverError): ...
class InvalidPlanError(MoverError): ...
class FormatError(MoverError): ...
class CancelledError(MoverError): ...

@final
class CopyProgress:
    @property
    def bytes_planned(self) -> int: ...
    @property
    def bytes_resumed(self) -> int: ...
    @property
    def bytes_read(self) -> int: ...
    @property
    def bytes_written(self) -> int: ...
    @property
    def bytes_zeroed(self) -> int: ...
    @property
    def extents_total(self) -> int: ...
    @property
    def extents_done(self) -> int: ...
    @property
    def seconds(self) -> float: ...
    @property
    def throughput_bytes_per_s(self) -> float: ...
    @property
    def eta_seconds(self) -> float | None: ...
    @property
    def percent(self) -> float: ...
    @property
    def finished(self) -> bool: ...

@final
class Copy:
    def __new__(
        cls,
        source: str,
        target: str,
        *,
        extents: list[tuple[int, int]] | None = None,
        allocated_only: bool = False,
        connections: int = 4,
        requests: int = 16,
        request_size: int = 1048576,
        checkpoint: str | PathLike[str] | None = None,
        target_is_zero: bool = False,
        checkpoint_interval: float = 5.0,
        reconnect_timeout: float = 60.0,
    ) -> Copy: ...
    def run(self) -> CopyProgress: ...
    def progress(self) -> CopyProgress: ...
    def cancel(self) -> None: ...
    @property
    def cancelled(self) -> bool: ...
