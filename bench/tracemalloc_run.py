"""Run ``oma.server`` (its command-line arguments follow) with a tracemalloc snapshot on SIGUSR2.

A debugging aid of ``bench/oma_api.py --rss`` (``OMA_TRACEMALLOC_DIR``); start Python with
``-X tracemalloc=25`` so allocations are traced from the first import.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import time
import tracemalloc
from pathlib import Path
from types import FrameType


def _dump(signum: int, frame: FrameType | None) -> None:
    directory = Path(os.environ["OMA_TRACEMALLOC_DIR"])
    tracemalloc.take_snapshot().dump(str(directory / f"{time.monotonic_ns()}.snap"))


if __name__ == "__main__":
    if not tracemalloc.is_tracing():
        tracemalloc.start(25)
    signal.signal(signal.SIGUSR2, _dump)
    sys.argv[0] = "oma.server"
    runpy.run_module("oma.server", run_name="__main__", alter_sys=True)
