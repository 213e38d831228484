"""The VMA's quart-trio application: ``create_app(config)``.

Blueprints (all under ``/api/v1``): health, cleanup, status (+ progress), config, discover,
replicate. Replication jobs run as background tasks in the app's nursery; at shutdown they get
``BACKGROUND_TASK_SHUTDOWN_TIMEOUT`` seconds, then are cancelled, and their failure paths still
remove their snapshots (shielded).

Every call to vCenter has a deadline (``vsphere_call_timeout``, ``vsphere_task_timeout``). At
start, and every ``recovery_interval`` seconds, what jobs of a previous run left (snapshots, work
directories) is found through the job journal and removed (``vma/recovery.py``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator

import trio
from quart_trio import QuartTrio

from vma.api import cleanup, config, discover, health, replicate, status
from vma.config import VmaConfig
from vma.errors import install_error_handlers
from vma.recovery import recovery_loop
from vma.state import VmaState
from vma.vsphere import configure_deadlines

API_PREFIX = "/api/v1"
log = logging.getLogger(__name__)


def create_app(cfg: VmaConfig) -> QuartTrio:
    app = QuartTrio("vma")
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = 10
    app.config["JSON_SORT_KEYS"] = False
    st = VmaState(cfg)
    app.extensions["vma"] = st
    for module in (health, cleanup, status, config, discover, replicate):
        app.register_blueprint(module.bp, url_prefix=API_PREFIX)
    install_error_handlers(app)

    @app.while_serving
    async def _lifespan() -> AsyncGenerator[None, None]:
        await trio.Path(cfg.work_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        configure_deadlines(cfg.vsphere_call_timeout, cfg.vsphere_task_timeout)
        stop = trio.Event()
        app.add_background_task(recovery_loop, cfg, st.tracker, stop)
        log.info(
            "VMA API serving",
            extra={"action": "startup", "source": cfg.source, "oma_url": cfg.oma_url},
        )
        yield
        stop.set()
        log.info("VMA API stopping", extra={"action": "shutdown"})
        await st.aclose()

    return app
