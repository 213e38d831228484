"""What the API's CloudStack endpoints call: one function per endpoint, each given the database,
the secret box and the configuration (this package never reaches for the running app).

Every function that talks to CloudStack opens its client here — from the request's login or the
active settings (:func:`~oma.cloudstack.settings.login_for`) — and closes it before it returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from oma.cloudstack import network_mappings as mappings
from oma.cloudstack import resources, settings
from oma.cloudstack.client import ClientOptions, CloudStackClient, Login
from oma.cloudstack.omavm import detect_oma_vm, host_addresses
from oma.cloudstack.settings import Resources, StoredSettings
from oma.cloudstack.validation import validate
from oma.config import OmaConfig
from oma.crypto import SecretBox
from oma.store.pages import Page
from pyapp.api import ApiError
from pyapp.db import Database

log = logging.getLogger(__name__)

CLOUDSTACK_VALIDATION_FAILED = "CLOUDSTACK_VALIDATION_FAILED"


@dataclass(frozen=True)
class LoginFields:
    """``api_url``, ``api_key``, ``secret_key`` of a request body: all three, or none (the
    active settings)."""

    api_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)


@asynccontextmanager
async def _client(
    db: Database, box: SecretBox, config: OmaConfig, given: LoginFields, config_id: int | None = None
) -> AsyncIterator[tuple[CloudStackClient, StoredSettings | None]]:
    """A client of the request's login; without one, of the settings ``config_id`` (else of the
    active settings)."""
    stored: StoredSettings | None
    if config_id is not None and given == LoginFields():
        stored = await settings.settings_by_id(db, box, config_id)
        login = stored.login
    else:
        login, stored = await settings.login_for(db, box, given.api_url, given.api_key, given.secret_key)
    with CloudStackClient(login, ClientOptions.from_config(config)) as client:
        yield client, stored


# --- CloudStack (OSSEA) settings --------------------------------------------------------------


async def test_connection(
    db: Database, box: SecretBox, config: OmaConfig, given: LoginFields, config_id: int | None = None
) -> dict[str, Any]:
    """Connect and say how it went: ``{success, message, api_url, cloudstack_version, zone_count,
    account, duration_ms}``, or ``success: false`` with CloudStack's refusal as ``error``
    (``{code, message, details}``, as the error envelope would carry it). Testing the saved
    settings (the active ones, or ``config_id``) records the outcome on them."""
    started = time.monotonic()
    async with _client(db, box, config, given, config_id) as (client, stored):
        result = await _test(client)
    result["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
    if stored is not None:
        await settings.record_test(db, stored.id, result["success"], result["message"])
    log.info(
        "CloudStack connection tested",
        extra={"action": "cloudstack_test", "api_url": result["api_url"], "success": result["success"]},
    )
    return result


async def _test(client: CloudStackClient) -> dict[str, Any]:
    base: dict[str, Any] = {"api_url": client.login.api_url}
    try:
        zones = await client.list("listZones")
        capability = (await client.request("listCapabilities")).get("capability") or {}
        accounts = await client.list("listAccounts")
    except ApiError as exc:
        return {
            **base,
            "success": False,
            "message": f"connection to CloudStack failed: {exc.message}",
            "error": {"code": exc.code, "message": exc.message, "details": exc.details},
        }
    version = capability.get("cloudstackversion") if isinstance(capability, dict) else None
    account = accounts[0] if len(accounts) == 1 else None
    return {
        **base,
        "success": True,
        "message": f"connected to CloudStack {version or '(version unknown)'}; {len(zones)} zones",
        "cloudstack_version": version,
        "zone_count": len(zones),
        "account": {"name": account.get("name"), "domain": account.get("domain")} if account else None,
    }


async def detect(db: Database, box: SecretBox, config: OmaConfig, given: LoginFields) -> dict[str, Any]:
    """The OMA VM found by this host's addresses (:mod:`oma.cloudstack.omavm`)."""
    async with _client(db, box, config, given) as (client, _):
        found = await detect_oma_vm(client, host_addresses(config))
    vm = found.pop("vm")
    return {"success": True, "oma_info": vm, **found}


async def settings_networks(db: Database, box: SecretBox, config: OmaConfig, zone_id: str) -> dict[str, Any]:
    async with settings.active_client(db, box, config) as (client, _):
        found = await resources.networks(client, zone_id)
    return {"networks": found, "count": len(found)}


async def validate_settings(
    db: Database, box: SecretBox, config: OmaConfig, given: LoginFields, choices: dict[str, str | None]
) -> dict[str, Any]:
    """Every readiness check (:mod:`oma.cloudstack.validation`) of the request's choices, the
    saved ones filling in what it does not name (only with the saved login)."""
    async with _client(db, box, config, given) as (client, stored):
        base = stored.resources if stored is not None else Resources()
        return await validate(client, base.merged(**choices))


async def discover_all(
    db: Database, box: SecretBox, config: OmaConfig, given: LoginFields, domain: str
) -> dict[str, Any]:
    """Everything to choose from, and the OMA VM: ``oma_vm_id``/``oma_vm_name`` (null, with
    ``oma_vm_error``, when it cannot be found)."""
    async with _client(db, box, config, given) as (client, _):
        found = await resources.discover(client, domain=domain)
        oma: dict[str, Any] = {"oma_vm_id": None, "oma_vm_name": None, "oma_vm": None}
        try:
            detected = await detect_oma_vm(client, host_addresses(config))
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise
            oma["oma_vm_error"] = {"code": exc.code, "message": exc.message, "details": exc.details}
        else:
            vm = detected["vm"]
            oma.update(oma_vm_id=vm["id"], oma_vm_name=vm["name"], oma_vm=detected)
    return {"success": True, **oma, **found}


# --- OSSEA config -----------------------------------------------------------------------------


async def discover_resources(
    db: Database, box: SecretBox, config: OmaConfig, given: LoginFields, domain: str
) -> dict[str, Any]:
    async with _client(db, box, config, given) as (client, _):
        return {"success": True, **await resources.discover(client, domain=domain)}


async def _verified(config: OmaConfig, login: Login, chosen: Resources) -> dict[str, Any]:
    """Check what is chosen before it is saved: 422 ``CLOUDSTACK_VALIDATION_FAILED`` (the checks
    in ``details``) when a check fails. A refused login fails as the client maps it."""
    with CloudStackClient(login, ClientOptions.from_config(config)) as client:
        result = await validate(client, chosen, require_choices=False)
    if result["overall_status"] == "fail":
        failed = [f"{name}: {c['message']}" for name, c in result["checks"].items() if c["status"] == "fail"]
        raise ApiError(
            422,
            CLOUDSTACK_VALIDATION_FAILED,
            "CloudStack refuses these settings: " + "; ".join(failed),
            result["checks"],
        )
    return result


async def ossea_config(
    db: Database,
    box: SecretBox,
    config: OmaConfig,
    *,
    action: str,
    config_id: int | None,
    fields: dict[str, Any] | None,
    verify: bool,
    actor: str,
) -> tuple[dict[str, Any], int]:
    """``POST /ossea/config``: ``get`` (one by ``id``, or all), ``create``, ``update`` (``id``;
    what ``config`` names changes), ``delete`` (``id``), ``test`` (``config``'s login, else ``id``'s,
    else the active settings'). Create and update check the settings first unless ``verify`` is
    false. Answers ``(body, status)``."""
    answer: dict[str, Any] = {"action": action, "success": True}
    if action == "get":
        if config_id is not None:
            return {**answer, "config": await settings.get_config(db, config_id)}, 200
        configs = await settings.list_configs(db)
        return {**answer, "configs": configs, "count": len(configs)}, 200
    if action == "delete":
        await settings.delete_config(db, _needs_id(action, config_id))
        return {**answer, "id": config_id, "message": f"CloudStack settings {config_id} deleted"}, 200
    if action == "test":
        given = LoginFields(**{k: (fields or {}).get(k) for k in ("api_url", "api_key", "secret_key")})
        result = await test_connection(db, box, config, given, config_id)
        return {
            **answer,
            "success": result["success"],
            "message": result["message"],
            "test_result": result,
        }, 200
    values = dict(fields or {})
    chosen = {k: values.pop(k, None) for k in settings.RESOURCE_FIELDS}
    if action == "create":
        missing = [k for k in ("name", "api_url", "api_key", "secret_key") if not values.get(k)]
        if missing:
            raise ApiError.unprocessable(f"create needs config.{', config.'.join(missing)}")
        login = Login(values["api_url"], values["api_key"], values["secret_key"])
        resources_ = Resources().merged(**chosen)
        validation = await _verified(config, login, resources_) if verify else None
        created = await settings.create_config(
            db,
            box,
            name=values["name"],
            login=login,
            resources=resources_,
            is_active=bool(values.get("is_active", False)),
            created_by=actor,
        )
        body = {**answer, "message": "CloudStack settings created", "config": created}
        return ({**body, "validation": validation} if validation else body), 201
    if action == "update":
        config_id = _needs_id(action, config_id)
        if not values and not any(v is not None for v in chosen.values()):
            raise ApiError.unprocessable("update needs config with the fields to change")
        stored = await settings.settings_by_id(db, box, config_id)
        login = _changed_login(
            stored.login, values.get("api_url"), values.get("api_key"), values.get("secret_key")
        )
        validation = await _verified(config, login, stored.resources.merged(**chosen)) if verify else None
        updated = await settings.update_config(
            db,
            box,
            config_id,
            name=values.get("name"),
            api_url=values.get("api_url"),
            api_key=values.get("api_key"),
            secret_key=values.get("secret_key"),
            resources=chosen,
            is_active=values.get("is_active"),
        )
        body = {**answer, "message": "CloudStack settings updated", "config": updated}
        return ({**body, "validation": validation} if validation else body), 200
    raise ApiError.unprocessable(f"unknown action {action!r}: get, create, update, delete or test")


def _changed_login(stored: Login, api_url: str | None, api_key: str | None, secret_key: str | None) -> Login:
    """The saved login with what a request changes. The keys go together, and a new URL comes
    with them: saved keys are never sent to a URL a request names."""
    if (api_key is None) != (secret_key is None):
        raise ApiError.unprocessable(
            "give api_key and secret_key together (or neither, to keep the saved ones)"
        )
    if api_key is None and api_url is not None and api_url != stored.api_url:
        raise ApiError.unprocessable("a new api_url needs its api_key and secret_key")
    return Login(api_url or stored.api_url, api_key or stored.api_key, secret_key or stored.secret_key)


def _needs_id(action: str, config_id: int | None) -> int:
    if config_id is None:
        raise ApiError.unprocessable(f"{action} needs the id of the settings")
    return config_id


async def save_streamlined(
    db: Database,
    box: SecretBox,
    config: OmaConfig,
    *,
    name: str,
    given: LoginFields,
    chosen: dict[str, str | None],
    verify: bool,
    actor: str,
) -> dict[str, Any]:
    """``POST /ossea/config-streamlined``: save the settings under ``name`` (created, or updated
    when they exist: their keys are kept when the request gives none) and make them the active
    ones. No ``oma_vm_id``: the OMA VM is detected (:mod:`~oma.cloudstack.omavm`)."""
    existing_id = await settings.config_id_by_name(db, name)
    if existing_id is not None:
        stored = await settings.settings_by_id(db, box, existing_id)
        login = _changed_login(stored.login, given.api_url, given.api_key, given.secret_key)
    elif given.api_url and given.api_key and given.secret_key:
        login = Login(given.api_url, given.api_key, given.secret_key)
    else:
        raise ApiError.unprocessable("new settings need api_url, api_key and secret_key")
    with CloudStackClient(login, ClientOptions.from_config(config)) as client:
        if not chosen.get("oma_vm_id"):
            chosen = {
                **chosen,
                "oma_vm_id": (await detect_oma_vm(client, host_addresses(config)))["vm"]["id"],
            }
    resources_ = Resources().merged(**chosen)
    validation = await _verified(config, login, resources_) if verify else None
    if existing_id is None:
        saved = await settings.create_config(
            db, box, name=name, login=login, resources=resources_, is_active=True, created_by=actor
        )
    else:
        saved = await settings.update_config(
            db,
            box,
            existing_id,
            api_url=login.api_url,
            api_key=login.api_key,
            secret_key=login.secret_key,
            resources={k: getattr(resources_, k) for k in settings.RESOURCE_FIELDS},
            is_active=True,
        )
    return {
        "success": True,
        "message": f"CloudStack settings {name!r} saved and active",
        "config": saved,
        "validation": validation,
    }


# --- network mappings and offerings -------------------------------------------------------------


async def available_networks(
    db: Database, box: SecretBox, config: OmaConfig, zone_id: str | None
) -> dict[str, Any]:
    """Networks to map to: those of ``zone_id``, else of the configured zone, else all."""
    async with settings.active_client(db, box, config) as (client, stored):
        zone = stored.resources.zone_id if zone_id is None else zone_id
        found = await resources.networks(client, zone)
    return {"networks": found, "count": len(found), "zone_id": zone or None}


async def resolve_networks(
    db: Database, box: SecretBox, config: OmaConfig, wanted: list[str], *, single: bool = False
) -> dict[str, Any]:
    """Networks by id or name (:func:`~oma.cloudstack.network_mappings.resolve_networks`); one
    name asked for alone that names no network is a 404, one naming several a 409."""
    async with settings.active_client(db, box, config) as (client, stored):
        found = await mappings.resolve_networks(client, wanted, stored.resources.zone_id)
    if single and found["not_found"]:
        raise ApiError.not_found(f"CloudStack has no network {wanted[0]!r} that the OMA's API key may use")
    if single and found["ambiguous"]:
        ids = ", ".join(f"{n['id']} ({n['zone_name']})" for n in found["ambiguous"][0]["candidates"])
        raise ApiError.conflict(f"several CloudStack networks are named {wanted[0]!r}: use an id: {ids}")
    return found


async def available_service_offerings(db: Database, box: SecretBox, config: OmaConfig) -> dict[str, Any]:
    async with settings.active_client(db, box, config) as (client, _):
        found = await resources.service_offerings(client)
    return {"service_offerings": found, "count": len(found)}


async def create_mapping(
    db: Database,
    box: SecretBox,
    config: OmaConfig,
    *,
    vm: str,
    source_network_name: str,
    destination_network_id: str,
    is_test_network: bool,
    actor: str,
) -> tuple[dict[str, Any], bool]:
    async with settings.active_client(db, box, config) as (client, _):
        return await mappings.create_mapping(
            db,
            client,
            vm=vm,
            source_network_name=source_network_name,
            destination_network_id=destination_network_id,
            is_test_network=is_test_network,
            created_by=actor,
        )


async def list_mappings(db: Database, page: Page, is_test_network: bool | None) -> str:
    return await mappings.list_mappings(db, page, is_test_network)


async def vm_mappings(db: Database, vm: str) -> dict[str, Any]:
    return await mappings.vm_mappings(db, vm)


async def mapping_status(db: Database, box: SecretBox, config: OmaConfig, vm: str) -> dict[str, Any]:
    """The VM's mapping status; the destinations are checked when CloudStack is configured."""
    try:
        stored = await settings.active_settings(db, box)
    except ApiError as exc:
        if exc.code != settings.CLOUDSTACK_NOT_CONFIGURED:
            raise
        return await mappings.mapping_status(db, vm, None)
    with CloudStackClient(stored.login, ClientOptions.from_config(config)) as client:
        return await mappings.mapping_status(db, vm, client)


async def delete_mapping(
    db: Database, vm: str, source_network_name: str, is_test_network: bool | None
) -> dict[str, Any]:
    deleted = await mappings.delete_mapping(db, vm, source_network_name, is_test_network)
    return {"message": f"{deleted} network mappings deleted", "deleted": deleted}
