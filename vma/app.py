"""The VMA's quart-trio application: ``create_app(config)``.

Blueprints (all under ``/api/v1``): health, cleanup, status (+ progress), config, discover,
replicate. Replication jobs run as background tasks in the app's nursery; at shutdown they get
``BACKGROUND_TASK_SHUTDOWN_TIMEOUT`` seconds, then are cancelled, and their failure paths still
remove their snapshots (shielded).

Every call to vCenter has a deadline (``vsphere_call_timeout``, ``vsphere_task_timeout``). At
start, and every ``recovery_interval`` seconds, what jobs of a previous run left (snapshots, work
directories) is found through the job journal and removed (:mod:`vma.replication.recovery`). With
``tunnel_host`` set, the SSH tunnel to the OMA is kept up beside them (:mod:`vma.tunnel`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator

import trio
from quart import Response, request
from quart_schema import hide
from quart_trio import QuartTrio

from pyapp import metrics
from pyapp.vma_auth import AuthFailed, SecretFile, Verifier
from vma.api import cleanup, config, discover, health, power, replicate, status
from vma.api.errors import error_response, install_error_handlers
from vma.config import VmaConfig
from vma.replication.recovery import recovery_loop
from vma.state import VmaState
from vma.vsphere.client import configure_deadlines, configure_tls

API_PREFIX = "/api/v1"
METRICS_PATH = "/metrics"
#: Paths answered without the OMA's signature (docs/vma.md, "Who may call the VMA"): the health
#: check, and Prometheus' scrape, which a scraper on this host cannot sign (the API listens on
#: loopback; docs/vma.md, "Metrics").
PUBLIC_PATHS = frozenset({f"{API_PREFIX}/health", METRICS_PATH})
log = logging.getLogger(__name__)


@hide  # Prometheus' text format, not part of the JSON API the OpenAPI document describes
async def metrics_view() -> Response:
    """Prometheus' scrape (pyapp/metrics.py)."""
    return metrics.metrics_response()


def create_app(cfg: VmaConfig) -> QuartTrio:
    app = QuartTrio("vma")
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = 10
    app.config["JSON_SORT_KEYS"] = False
    st = VmaState(cfg)
    app.extensions["vma"] = st
    for module in (health, cleanup, status, config, discover, replicate, power):
        app.register_blueprint(module.bp, url_prefix=API_PREFIX)
    install_error_handlers(app)
    metrics.time_requests(app)  # before _authenticate: a refused request is timed too
    app.add_url_rule(METRICS_PATH, "metrics", metrics_view, methods=["GET"])
    secret = SecretFile(cfg.oma_secret_file)
    verifier = Verifier()

    @app.before_request
    async def _authenticate() -> Response | None:
        """Only the OMA this VMA is enrolled with may call it: every request but ``/health``
        carries that OMA's signature (pyapp/vma_auth.py)."""
        if request.path in PUBLIC_PATHS and request.method in ("GET", "HEAD"):
            return None
        body = await request.get_data(cache=True, as_text=False, parse_form_data=False)
        try:
            verifier.verify(
                secret.read(),
                request.headers.get("Authorization"),
                request.method,
                request.path,
                request.query_string.decode("latin-1"),
                body,
            )
        except AuthFailed as e:
            log.warning(
                "request refused: %s", e, extra={"action": "auth_refused", "path": request.path}
            )
            response = error_response(401, "UNAUTHORIZED", str(e))
            response.headers["WWW-Authenticate"] = "Mover-HMAC"
            return response
        return None

    @app.while_serving
    async def _lifespan() -> AsyncGenerator[None, None]:
        await trio.Path(cfg.work_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        configure_deadlines(cfg.vsphere_call_timeout, cfg.vsphere_task_timeout)
        configure_tls(cfg.vcenter_ca_file)
        stop = trio.Event()
        app.add_background_task(recovery_loop, cfg, st.tracker, stop)
        tunnel_scope = trio.CancelScope()

        async def keep_tunnel() -> None:
            with tunnel_scope:
                await st.tunnel.run()

        app.add_background_task(keep_tunnel)
        log.info(
            "VMA API serving",
            extra={"action": "startup", "source": cfg.source, "oma_url": cfg.oma_url},
        )
        yield
        stop.set()
        tunnel_scope.cancel()
        log.info("VMA API stopping", extra={"action": "shutdown"})
        await st.aclose()

    return app
