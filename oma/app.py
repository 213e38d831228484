"""The OMA application: ``create_app(config)`` builds the quart-trio app.

While serving, the app holds (opened in ``while_serving``, closed in reverse order):

1. the database — ``DATABASE_URL`` when configured, else an embedded PostgreSQL in
   ``<data-dir>/pgdata`` — with the numbered migrations of ``oma/store/migrations`` applied under an
   advisory lock;
2. the secret box (AES key file, created 0600 at first start);
3. the first administrator from configuration, when no user exists yet;
4. an httpx client for the VMA API;
5. a background task in the app nursery pruning expired tokens and pairing codes, stopped by an
   event at shutdown (quart-trio also bounds it with ``BACKGROUND_TASK_SHUTDOWN_TIMEOUT``);
6. when embedded, a watchdog restarting PostgreSQL if it dies (every database call retries a lost
   connection with backoff meanwhile, ``OMA_DB_RETRY_DEADLINE``);
7. the replication engine (``oma.replication.engine``, unless ``run_replications`` is off),
   subscribed to the replication job events (``OmaState.job_events``) so that a job created here
   is claimed at once, and handed CloudStack's replica volumes (``OmaState.replica_volumes``:
   :class:`oma.cloudstack.volumes.ReplicaVolumes` as the replication domain's ``CloudVolumes``;
   one :class:`~oma.cloudstack.volumes.OmaVmLock` per process), and the backup services (unless
   ``run_backups`` is off: the backup engine ``oma.backups.engine``, the copy worker, retention),
   other background tasks: stopped first at shutdown, and waited for (bounded) so that they end
   their jobs, release the VMA's exports and remove unfinished files while the database and the
   VMA client are still open.

The app is the service shell: it wires the domains (``oma.replication``, ``oma.backups``,
``oma.restore``, …) to each other and to the HTTP layer (``oma.api``, one blueprint per area in
``API_BLUEPRINTS``); the domains never import it, nor ``oma.state`` or ``oma.api``.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import AsyncGenerator, Callable

import httpx
import trio
from quart import Response, request
from quart_schema import QuartSchema, hide
from quart_schema.openapi import Info
from quart_trio import QuartTrio

from oma.access import tokens
from oma.access.users import ensure_first_admin
from oma.api import (
    auth,
    backups,
    cloudstack,
    credentials,
    debug,
    discovery,
    enrollment,
    failover,
    health,
    network_mappings,
    policies,
    replications,
    repositories,
    restore,
    users,
    vm_contexts,
    vms,
)
from oma.api.access import authorize_request, requires
from oma.backups.copies import COPY_WORKER_KEY, CopyWorker, enqueue_policy_copies
from oma.backups.copies import STOP_TIMEOUT_S as COPY_STOP_TIMEOUT
from oma.backups.engine import BackupEngine
from oma.backups.retention import RETENTION_KEY, RetentionService
from oma.cloudstack.volumes import OmaVmLock, ReplicaVolumes
from oma.config import OmaConfig
from oma.credentials import vmware
from oma.crypto import SecretBox, load_or_create_key
from oma.enrollment import codes
from oma.failover.engine import FailoverEngine
from oma.failover.guest import guest_check
from oma.replication.engine import ReplicationEngine
from oma.restore.service import start_restore_service
from oma.state import STATE_KEY, OmaState
from oma.store import MIGRATIONS_DIR
from oma.vma_client import VmaClient
from oma.workers import FINISH_TIMEOUT
from pyapp import metrics
from pyapp.api import fast_json_views, install_error_handlers
from pyapp.db import (
    EmbeddedPostgres,
    apply_migrations,
    create_database,
    load_migrations,
    open_database,
    report_pool_metrics,
    watch_embedded,
    with_database,
)
from pyapp.logs import RecentRecords, log_context

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
SWAGGER_PREFIX = f"{API_PREFIX}/swagger/"
EMBEDDED_DB_NAME = "oma"
METRICS_PATH = "/metrics"
ADMIN_BLUEPRINTS = frozenset({"credentials", "enrollment_admin", "debug"})
PRUNE_INTERVAL_S = 600.0
#: The blueprint of every API area (one per area of the seed), all under ``API_PREFIX``.
API_BLUEPRINTS = (
    auth.bp,
    health.bp,
    vms.bp,
    replications.bp,
    vm_contexts.bp,
    discovery.bp,
    credentials.bp,
    debug.bp,
    restore.bp,
    repositories.bp,
    policies.bp,
    backups.bp,
    users.bp,
    enrollment.admin_bp,
    enrollment.public_bp,
    cloudstack.settings_bp,
    cloudstack.ossea_bp,
    network_mappings.bp,
    failover.bp,
)


def metrics_without_token(access: str, remote_addr: str | None) -> bool:
    """``/metrics`` is read without a token by anyone (``public``), from this host only
    (``loopback``: a Prometheus on the OMA host, or reaching it through a local proxy), or by
    nobody (``token``: a viewer's bearer token, as for the API)."""
    if access == "public":
        return True
    if access != "loopback" or not remote_addr:
        return False
    try:
        return ipaddress.ip_address(remote_addr).is_loopback
    except ValueError:
        return False


def create_app(config: OmaConfig, *, recent_logs: RecentRecords | None = None) -> QuartTrio:
    app = QuartTrio("oma")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = 10
    app.json.sort_keys = False  # type: ignore[attr-defined]
    QuartSchema(
        app,
        openapi_path=f"{SWAGGER_PREFIX}openapi.json",
        swagger_ui_path=SWAGGER_PREFIX,
        redoc_ui_path=f"{SWAGGER_PREFIX}redoc",
        scalar_ui_path=None,
        info=Info(title="OMA API", version="1"),
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}},
        security=[{"bearer": []}],
    )
    install_error_handlers(app)
    metrics.time_requests(app)  # first, so that a request refused by _authenticate is timed too
    st = OmaState(config=config, recent_logs=recent_logs)
    app.extensions[STATE_KEY] = st

    for blueprint in API_BLUEPRINTS:
        app.register_blueprint(blueprint, url_prefix=API_PREFIX)
    fast_json_views(app)

    @app.get(METRICS_PATH)
    @hide  # Prometheus' text format, not part of the JSON API the OpenAPI document describes
    @requires("viewer")
    async def metrics_view() -> Response:
        """Prometheus' scrape (pyapp/metrics.py); who may read it: ``OMA_METRICS_PUBLIC``."""
        return metrics.metrics_response()

    @app.before_request
    async def _authenticate() -> None:
        if request.path.startswith(SWAGGER_PREFIX):
            return
        if request.path == METRICS_PATH and metrics_without_token(config.metrics_access, request.remote_addr):
            return
        view = app.view_functions.get(request.endpoint) if request.endpoint else None
        await authorize_request(st.db, view, admin_area=request.blueprint in ADMIN_BLUEPRINTS)

    @app.while_serving
    async def _lifespan() -> AsyncGenerator[None, None]:
        embedded: EmbeddedPostgres | None = None
        dsn = config.database_url
        if dsn is None:
            embedded = EmbeddedPostgres(config.pgdata)
            admin_dsn = await embedded.start()
            await create_database(admin_dsn, EMBEDDED_DB_NAME)
            dsn = with_database(admin_dsn, EMBEDDED_DB_NAME)
            log.info("embedded PostgreSQL running", extra={"action": "startup", "pgdata": str(config.pgdata)})
        try:
            async with open_database(
                dsn, min_size=2, max_size=config.db_pool_size, retry_deadline=config.db_retry_deadline
            ) as db:
                st.db_ = db
                st.migrations_applied = await apply_migrations(db, load_migrations(MIGRATIONS_DIR))
                st.box_ = SecretBox(await trio.to_thread.run_sync(load_or_create_key, config.key_file))
                admin, password = config.admin_username, config.admin_password
                if admin and password and await ensure_first_admin(db, admin, password):
                    log.info(
                        "first administrator created from configuration",
                        extra={"action": "startup", "subject": admin},
                    )
                timeout = httpx.Timeout(config.vma_timeout, connect=min(config.vma_timeout, 5.0))
                async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:
                    st.vma_ = VmaClient(http, config.vma_url, config.vma_secret_file)
                    stop = trio.Event()

                    async def prune_loop() -> None:
                        with log_context(action="prune"):
                            while not stop.is_set():
                                try:
                                    await tokens.prune_expired_tokens(db)
                                    await codes.prune_expired_codes(db)
                                except Exception:
                                    log.exception("pruning expired tokens failed")
                                with trio.move_on_after(PRUNE_INTERVAL_S):
                                    await stop.wait()

                    app.add_background_task(prune_loop)
                    app.add_background_task(report_pool_metrics, db, stop)
                    if embedded is not None:  # killed or crashed: started again, same socket
                        app.add_background_task(watch_embedded, embedded, stop)
                    restore_service = start_restore_service(app, config, db)  # cleanup when run_backups
                    resolve_login = functools.partial(vmware.resolve_login, db, st.box)
                    # The replication domain's cloud volumes: CloudStack's, whenever it is configured.
                    oma_vm_lock = OmaVmLock(db)  # one per process: every volume operation on the OMA VM
                    st.replica_volumes = ReplicaVolumes(db, st.box, config, oma_vm_lock)
                    # The failover engine: CloudStack through the same OMA VM lock as the replicas.
                    st.failover = FailoverEngine(
                        config,
                        db,
                        st.box,
                        oma_vm_lock,
                        guest_check(config.failover_guest_check),
                        boot_timeout=config.failover_boot_timeout,
                    )
                    app.add_background_task(st.failover.run)
                    engine: ReplicationEngine | None = None
                    stop_listening: Callable[[], None] | None = None
                    if config.run_replications:
                        engine = ReplicationEngine(
                            config, db, st.vma_, resolve_login, st.job_events, st.replica_volumes
                        )
                        st.engine = engine
                        stop_listening = st.job_events.subscribe(engine.job_changed)
                        app.add_background_task(engine.run)
                    copier: CopyWorker | None = None
                    retention: RetentionService | None = None
                    backup_engine: BackupEngine | None = None
                    if config.run_backups:
                        copier = CopyWorker(config, db, st.box)
                        retention = RetentionService(config, db, st.box)

                        async def queue_copies(backup_id: str, copier: CopyWorker = copier) -> None:
                            """A new point's copy rules: queue its copies, wake the worker."""
                            if await enqueue_policy_copies(db, backup_id):
                                copier.wake()

                        backup_engine = BackupEngine(
                            config, db, st.vma_, st.box, resolve_login, after_backup=queue_copies
                        )
                        st.backup_engine, st.backup_engine_wakeup = backup_engine, backup_engine.wake
                        app.add_background_task(backup_engine.run)
                        app.extensions[COPY_WORKER_KEY], app.extensions[RETENTION_KEY] = copier, retention
                        app.add_background_task(copier.run)
                        app.add_background_task(retention.run)
                    log.info("OMA ready", extra={"action": "startup", "vma_url": config.vma_url})
                    try:
                        yield
                    finally:
                        stop.set()
                        if st.failover is not None:
                            st.failover.stop()  # an undo under way finishes (shielded)
                            with trio.move_on_after(FINISH_TIMEOUT):
                                await st.failover.stopped.wait()
                            st.failover = None
                        await restore_service.shutdown()
                        services = [s for s in (copier, retention) if s is not None]
                        engines = [e for e in (engine, backup_engine) if e is not None]
                        if stop_listening is not None:
                            stop_listening()
                        st.backup_engine_wakeup = None
                        for service in services:
                            service.stop()  # copies in flight go back to pending, their files removed
                        for e in engines:
                            e.stop()  # jobs and backups in flight end failed, exports released
                        with trio.move_on_after(COPY_STOP_TIMEOUT + 2):
                            for service in services:
                                await service.stopped.wait()
                        app.extensions.pop(COPY_WORKER_KEY, None)
                        app.extensions.pop(RETENTION_KEY, None)
                        with trio.move_on_after(2 * FINISH_TIMEOUT + 12):
                            for e in engines:
                                await e.stopped.wait()
                        st.engine = st.backup_engine = None
                        st.replica_volumes = None
                        st.vma_ = None
                st.db_ = None
        finally:
            if embedded is not None:  # shielded: a cancelled start-up still stops PostgreSQL
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(embedded.stop)
            log.info("OMA stopped", extra={"action": "shutdown"})

    return app
