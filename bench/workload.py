"""The reference workload of DESIGN.md ("The reference workload for performance"): the benchmarks' disk.

A disk of ``size`` bytes cut into ``chunk``-sized chunks; a seeded random half of them holds
random data (seed 1), the rest are holes. The incremental pass rewrites a seeded random 5% of
the chunks and returns them as an explicit extent list, as CBT would report them.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

GiB = 1 << 30
MiB = 1 << 20


def reference_disk(
    path: str | os.PathLike[str],
    *,
    size: int = 4 * GiB,
    chunk: int = MiB,
    fill: float = 0.5,
    seed: int = 1,
) -> list[tuple[int, int]]:
    """Write the reference disk (sparse) and return its data chunks as ``(offset, length)``."""
    rng = random.Random(seed)
    chunks = size // chunk
    filled = sorted(rng.sample(range(chunks), int(chunks * fill)))
    tmp = Path(f"{os.fspath(path)}.tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
        for i in filled:
            f.seek(i * chunk)
            f.write(rng.randbytes(chunk))
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    return [(i * chunk, chunk) for i in filled]


def rewrite_chunks(
    path: str | os.PathLike[str],
    *,
    fraction: float = 0.05,
    chunk: int = MiB,
    seed: int = 2,
) -> list[tuple[int, int]]:
    """Rewrite a random ``fraction`` of the chunks of the disk at ``path`` with new random data,
    as a guest would between two passes, and return the changed extents."""
    size = os.path.getsize(path)
    rng = random.Random(seed)
    chunks = size // chunk
    changed = sorted(rng.sample(range(chunks), max(1, int(chunks * fraction))))
    with open(path, "r+b") as f:
        for i in changed:
            f.seek(i * chunk)
            f.write(rng.randbytes(chunk))
        f.flush()
        os.fsync(f.fileno())
    return [(i * chunk, chunk) for i in changed]
