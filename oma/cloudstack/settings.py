"""CloudStack settings: where the OMA reaches CloudStack, with which keys, and the resources it
uses there (zone, offerings, network, template, the OMA VM).

Stored in ``cloudstack_configs`` (migration 012). The API key and the secret key are encrypted
with the secret box before they reach the database (purposes ``cloudstack-api-key`` and
``cloudstack-secret-key``: a ciphertext cannot be moved to another column) and no function here
returns them to a caller outside the package but as a :class:`~oma.cloudstack.client.Login`,
whose repr hides them. Several named sets may be stored; at most one is active (a partial unique
index), and every CloudStack call of the OMA uses the active one.

A request may name CloudStack itself (``api_url`` + ``api_key`` + ``secret_key``: a test before
saving) or nothing (the active settings): :func:`login_for` decides, and refuses half a login.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, Field

from oma.cloudstack.client import ClientOptions, CloudStackClient, Login, refuse_unsignable
from oma.config import OmaConfig
from oma.crypto import SecretBox, SecretBoxError
from oma.store.rows import row_dict
from pyapp.api import ApiError
from pyapp.db import Connection, Database, Record, UniqueViolation

log = logging.getLogger(__name__)

API_KEY_PURPOSE = b"cloudstack-api-key"
SECRET_KEY_PURPOSE = b"cloudstack-secret-key"
CLOUDSTACK_NOT_CONFIGURED = "CLOUDSTACK_NOT_CONFIGURED"
#: The name :func:`save_streamlined` stores under when the request names none.
DEFAULT_NAME = "default"
API_PATH = "/client/api"
PUBLIC_COLUMNS = (
    "id, name, api_url, domain, zone_id, template_id, network_id, service_offering_id, disk_offering_id,"
    " oma_vm_id, is_active, created_by, created_at, updated_at, last_test_at, last_test_ok, last_test_message"
)
#: A DNS name (internationalised names in their ASCII form, ``xn--…``).
_HOST = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def api_url_of(value: str) -> str:
    """CloudStack's API endpoint from what an operator types: ``host:8080``,
    ``http://host:8080`` or the endpoint itself, ``http://host:8080/client/api`` (no scheme:
    ``http``). Refused (ValueError): another scheme, a login in the URL, a query or fragment."""
    text = value.strip()
    if any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError("the CloudStack URL must not contain spaces or control characters")
    if "://" not in text:
        text = f"http://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"the CloudStack URL must be http or https, not {parts.scheme!r}")
    if "@" in parts.netloc:
        raise ValueError("the CloudStack URL must not carry a login; give api_key and secret_key")
    if not parts.hostname:
        raise ValueError("the CloudStack URL has no host")
    if not (_HOST.match(parts.hostname) or _is_ip(parts.hostname)):
        raise ValueError(f"the CloudStack URL's host is not a host name or address: {parts.hostname!r}")
    try:
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError as exc:
        raise ValueError(f"the CloudStack URL's port is not valid: {exc}") from None
    if parts.query or parts.fragment:
        raise ValueError("the CloudStack URL must not have a query or a fragment")
    path = parts.path.rstrip("/")
    if not path.endswith(API_PATH):
        path = f"{path}{API_PATH}"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _key(value: str) -> str:
    if not value or value.strip() != value or not value.isprintable():
        raise ValueError("a key must not be empty, start or end with spaces, nor hold control characters")
    if "~" in value:
        raise ValueError("contains '~': CloudStack would refuse every request signed with it")
    return value


def _cloudstack_id(value: str) -> str:
    if value and not _UUID.match(value):
        raise ValueError("not a CloudStack id (a UUID)")
    return value.lower()


#: Field types of the request models (the API layer's): checked before anything is sent.
ApiUrl = Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(api_url_of)]
ApiKey = Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(_key)]
CloudStackId = Annotated[str, Field(max_length=36), AfterValidator(_cloudstack_id)]
DomainName = Annotated[str, Field(max_length=255)]


@dataclass(frozen=True)
class Resources:
    """The CloudStack resources the OMA uses ("" where none is chosen)."""

    domain: str = ""
    zone_id: str = ""
    template_id: str = ""
    network_id: str = ""
    service_offering_id: str = ""
    disk_offering_id: str = ""
    oma_vm_id: str = ""

    def merged(self, **changes: str | None) -> Resources:
        """These resources with the given (not None) ones replaced."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({k: v for k, v in changes.items() if v is not None})
        return Resources(**values)


RESOURCE_FIELDS = tuple(f.name for f in fields(Resources))


@dataclass(frozen=True)
class StoredSettings:
    id: int
    name: str
    login: Login
    resources: Resources


def not_configured() -> ApiError:
    return ApiError(
        409,
        CLOUDSTACK_NOT_CONFIGURED,
        "CloudStack is not configured: save settings first (POST /ossea/config or /ossea/config-streamlined)",
    )


def _stored(row: Record, box: SecretBox) -> StoredSettings:
    try:
        api_key = box.decrypt(row["api_key_ciphertext"], API_KEY_PURPOSE)
        secret_key = box.decrypt(row["secret_key_ciphertext"], SECRET_KEY_PURPOSE)
    except SecretBoxError as exc:  # another key file than the one they were saved with
        raise ApiError.conflict(
            f"the keys of CloudStack settings {row['id']} cannot be decrypted with this OMA's key file"
            f" ({exc}): save them again"
        ) from exc
    return StoredSettings(
        id=row["id"],
        name=row["name"],
        login=Login(row["api_url"], api_key, secret_key, source="stored"),
        resources=Resources(**{name: row[name] for name in RESOURCE_FIELDS}),
    )


_SECRET_COLUMNS = f"{PUBLIC_COLUMNS}, api_key_ciphertext, secret_key_ciphertext"


async def active_settings(db: Database | Connection, box: SecretBox) -> StoredSettings:
    """The active settings, keys decrypted; 409 ``CLOUDSTACK_NOT_CONFIGURED`` when there are none."""
    row = await db.fetchrow(f"SELECT {_SECRET_COLUMNS} FROM cloudstack_configs WHERE is_active")
    if row is None:
        raise not_configured()
    return _stored(row, box)


async def settings_by_id(db: Database | Connection, box: SecretBox, config_id: int) -> StoredSettings:
    row = await db.fetchrow(f"SELECT {_SECRET_COLUMNS} FROM cloudstack_configs WHERE id = $1", config_id)
    if row is None:
        raise ApiError.not_found(f"CloudStack settings {config_id} not found")
    return _stored(row, box)


async def login_for(
    db: Database,
    box: SecretBox,
    api_url: str | None,
    api_key: str | None,
    secret_key: str | None,
) -> tuple[Login, StoredSettings | None]:
    """The login a request names — all three of ``api_url``, ``api_key``, ``secret_key`` — or,
    when it names none, the active settings' (with them). Half a login is refused (422): stored
    keys are never sent to a URL a request chose."""
    given = [v is not None for v in (api_url, api_key, secret_key)]
    if all(given):
        assert api_url is not None and api_key is not None and secret_key is not None
        refuse_unsignable({"apiKey": api_key})
        return Login(api_url, api_key, secret_key, source="request"), None
    if any(given):
        raise ApiError.unprocessable(
            "give api_url, api_key and secret_key together, or none of them to use the saved settings"
        )
    stored = await active_settings(db, box)
    return stored.login, stored


@asynccontextmanager
async def active_client(
    db: Database, box: SecretBox, config: OmaConfig
) -> AsyncIterator[tuple[CloudStackClient, StoredSettings]]:
    """A client of the active settings (409 when there are none), and the settings."""
    stored = await active_settings(db, box)
    with CloudStackClient(stored.login, ClientOptions.from_config(config)) as client:
        yield client, stored


def public(row: Record | dict[str, Any]) -> dict[str, Any]:
    """A stored settings row as answers show it: never a key, ``has_api_key`` instead."""
    out = row_dict(row, exclude=("api_key_ciphertext", "secret_key_ciphertext"))
    out["has_api_key"] = True
    return out


async def list_configs(db: Database) -> list[dict[str, Any]]:
    rows = await db.fetch(f"SELECT {PUBLIC_COLUMNS} FROM cloudstack_configs ORDER BY name")
    return [public(r) for r in rows]


async def get_config(db: Database | Connection, config_id: int) -> dict[str, Any]:
    row = await db.fetchrow(f"SELECT {PUBLIC_COLUMNS} FROM cloudstack_configs WHERE id = $1", config_id)
    if row is None:
        raise ApiError.not_found(f"CloudStack settings {config_id} not found")
    return public(row)


async def create_config(
    db: Database,
    box: SecretBox,
    *,
    name: str,
    login: Login,
    resources: Resources,
    is_active: bool,
    created_by: str,
) -> dict[str, Any]:
    """Store new settings (409 when the name is taken). Active: the one active before is not any
    more. The first settings stored are active whatever ``is_active`` says."""
    try:
        async with db.transaction() as conn:
            await conn.execute("LOCK TABLE cloudstack_configs IN SHARE ROW EXCLUSIVE MODE")
            any_active = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM cloudstack_configs WHERE is_active)"
            )
            active = is_active or not any_active
            if active:
                await conn.execute("UPDATE cloudstack_configs SET is_active = false WHERE is_active")
            row = await conn.fetchrow(
                "INSERT INTO cloudstack_configs (name, api_url, api_key_ciphertext, secret_key_ciphertext,"
                " domain, zone_id, template_id, network_id, service_offering_id, disk_offering_id, oma_vm_id,"
                f" is_active, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
                f" RETURNING {PUBLIC_COLUMNS}",
                name,
                login.api_url,
                box.encrypt(login.api_key, API_KEY_PURPOSE),
                box.encrypt(login.secret_key, SECRET_KEY_PURPOSE),
                *(getattr(resources, f) for f in RESOURCE_FIELDS),
                active,
                created_by,
            )
    except UniqueViolation as exc:
        raise ApiError.conflict(f"CloudStack settings named {name!r} already exist") from exc
    assert row is not None
    log.info(
        "CloudStack settings created",
        extra={"action": "cloudstack_config_create", "config_id": row["id"], "api_url": login.api_url},
    )
    return public(row)


async def update_config(
    db: Database,
    box: SecretBox,
    config_id: int,
    *,
    name: str | None = None,
    api_url: str | None = None,
    api_key: str | None = None,
    secret_key: str | None = None,
    resources: dict[str, str | None] | None = None,
    is_active: bool | None = None,
) -> dict[str, Any]:
    """Change what is given (None: unchanged). Making settings active deactivates the others."""
    changes = {k: v for k, v in (resources or {}).items() if v is not None}
    unknown = set(changes) - set(RESOURCE_FIELDS)
    if unknown:
        raise ValueError(f"not resources of the settings: {sorted(unknown)}")
    assignments = [f"{column} = ${i}" for i, column in enumerate(changes, start=7)]
    try:
        async with db.transaction() as conn:
            if is_active:
                await conn.execute(
                    "UPDATE cloudstack_configs SET is_active = false WHERE is_active AND id <> $1", config_id
                )
            row = await conn.fetchrow(
                "UPDATE cloudstack_configs SET name = COALESCE($2, name), api_url = COALESCE($3, api_url),"
                " api_key_ciphertext = COALESCE($4, api_key_ciphertext),"
                " secret_key_ciphertext = COALESCE($5, secret_key_ciphertext),"
                " is_active = COALESCE($6, is_active), updated_at = now()"
                + "".join(f", {a}" for a in assignments)
                + f" WHERE id = $1 RETURNING {PUBLIC_COLUMNS}",
                config_id,
                name,
                api_url,
                box.encrypt(api_key, API_KEY_PURPOSE) if api_key is not None else None,
                box.encrypt(secret_key, SECRET_KEY_PURPOSE) if secret_key is not None else None,
                is_active,
                *changes.values(),
            )
    except UniqueViolation as exc:
        raise ApiError.conflict(f"CloudStack settings named {name!r} already exist") from exc
    if row is None:
        raise ApiError.not_found(f"CloudStack settings {config_id} not found")
    log.info(
        "CloudStack settings updated",
        extra={
            "action": "cloudstack_config_update",
            "config_id": config_id,
            "keys_changed": api_key is not None or secret_key is not None,
            "changed": sorted(changes),
        },
    )
    return public(row)


async def delete_config(db: Database, config_id: int) -> None:
    deleted = await db.fetchval("DELETE FROM cloudstack_configs WHERE id = $1 RETURNING id", config_id)
    if deleted is None:
        raise ApiError.not_found(f"CloudStack settings {config_id} not found")
    log.info(
        "CloudStack settings deleted", extra={"action": "cloudstack_config_delete", "config_id": config_id}
    )


async def config_id_by_name(db: Database, name: str) -> int | None:
    value = await db.fetchval("SELECT id FROM cloudstack_configs WHERE name = $1", name)
    return int(value) if value is not None else None


async def record_test(db: Database, config_id: int, ok: bool, message: str) -> None:
    await db.execute(
        "UPDATE cloudstack_configs SET last_test_at = now(), last_test_ok = $2, last_test_message = $3"
        " WHERE id = $1",
        config_id,
        ok,
        message,
    )
