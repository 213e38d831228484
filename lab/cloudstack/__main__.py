"""``python -m lab.cloudstack``: the same as ``cloudstack-lab``."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
