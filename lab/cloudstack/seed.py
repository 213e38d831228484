"""The fixed part of the lab cloud: what an operator would have set up before the product arrives.

Zones, the domain and account, service and disk offerings, networks, templates, the hypervisor's
data-volume limit, global settings and the OMA's own VM are read from a JSON seed file
(``default_seed.json`` beside this module, or ``--seed FILE``) at every start; only what clients
create (VMs, volumes, snapshots, jobs) is state (:mod:`.state`). A seed refers to its own ids, so a
test can name a zone or an offering without listing it first.

A template may name an ``image`` (raw or QCOW2, a path relative to the seed file): lab only, a
template with contents, so a VM deployed from it boots (CloudStack would have downloaded it with
``registerTemplate``). Its format and size are checked when the seed is loaded.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lab.images import ImageError, inspect_image

DEFAULT_SEED = Path(__file__).with_name("default_seed.json")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Domain(_Strict):
    id: str
    name: str


class Account(_Strict):
    id: str
    name: str
    userid: str
    username: str


class Zone(_Strict):
    id: str
    name: str
    dns1: str = "8.8.8.8"


class ServiceOffering(_Strict):
    id: str
    name: str
    displaytext: str
    cpunumber: int = Field(gt=0)
    cpuspeed: int = Field(gt=0)
    memory: int = Field(gt=0, description="MiB")


class DiskOffering(_Strict):
    id: str
    name: str
    displaytext: str
    disksize: int = Field(ge=0, description="GiB; 0 for a custom-size offering")
    iscustomized: bool = False

    @model_validator(mode="after")
    def _size_or_custom(self) -> DiskOffering:
        if self.iscustomized == (self.disksize > 0):
            raise ValueError("a disk offering has either a disksize or iscustomized")
        return self


class Network(_Strict):
    id: str
    name: str
    displaytext: str
    zoneid: str
    type: Literal["Isolated", "Shared", "L2"]
    cidr: str | None = None
    gateway: str | None = None
    vlan: str | None = None

    @model_validator(mode="after")
    def _addresses(self) -> Network:
        if self.type == "L2":
            if self.cidr or self.gateway:
                raise ValueError("an L2 network has no cidr or gateway")
            return self
        if not self.cidr or not self.gateway:
            raise ValueError(f"a {self.type} network needs cidr and gateway")
        if ipaddress.ip_address(self.gateway) not in ipaddress.ip_network(self.cidr):
            raise ValueError(f"gateway {self.gateway} is not in {self.cidr}")
        return self


class Template(_Strict):
    id: str
    name: str
    displaytext: str
    size: int = Field(gt=0, description="bytes: a ROOT volume made from it is a raw file this long")
    ostypename: str = "Other Linux (64-bit)"
    format: str = "RAW"
    zoneid: str | None = Field(default=None, description="None: in every zone (crossZones)")
    image: Path | None = Field(
        default=None,
        description="lab only: a raw or QCOW2 image a ROOT volume made from the template holds"
        " (relative to the seed file); without one a ROOT volume is all zeros",
    )


class HypervisorCapability(_Strict):
    maxdatavolumeslimit: int = Field(gt=0)


class OmaVm(_Strict):
    id: str
    name: str
    zoneid: str
    networkid: str
    serviceofferingid: str
    templateid: str
    macaddress: str
    ipaddress: str


class Seed(_Strict):
    cloudstackversion: str
    domain: Domain
    account: Account
    zones: list[Zone]
    serviceofferings: list[ServiceOffering]
    diskofferings: list[DiskOffering]
    networks: list[Network]
    templates: list[Template]
    hypervisorcapabilities: dict[str, HypervisorCapability]
    configuration: dict[str, bool | int | str]
    omavm: OmaVm

    @model_validator(mode="after")
    def _references(self) -> Seed:
        zones = {z.id for z in self.zones}
        for net in self.networks:
            if net.zoneid not in zones:
                raise ValueError(f"network {net.name}: no zone {net.zoneid}")
        for tpl in self.templates:
            if tpl.zoneid is not None and tpl.zoneid not in zones:
                raise ValueError(f"template {tpl.name}: no zone {tpl.zoneid}")
        oma = self.omavm
        oma_net = next((n for n in self.networks if n.id == oma.networkid), None)
        if oma.zoneid not in zones or oma_net is None or oma_net.zoneid != oma.zoneid:
            raise ValueError("omavm: zoneid and networkid must name a zone and a network in it")
        if oma.serviceofferingid not in {o.id for o in self.serviceofferings}:
            raise ValueError("omavm: no service offering " + oma.serviceofferingid)
        if oma.templateid not in {t.id for t in self.templates}:
            raise ValueError("omavm: no template " + oma.templateid)
        if "KVM" not in self.hypervisorcapabilities:
            raise ValueError("hypervisorcapabilities: KVM is the lab's hypervisor")
        return self

    def config_bool(self, name: str) -> bool:
        value = self.configuration.get(name, False)
        return value if isinstance(value, bool) else str(value).lower() == "true"

    def config_int(self, name: str, default: int) -> int:
        value = self.configuration.get(name, default)
        return value if isinstance(value, int) and not isinstance(value, bool) else int(str(value))


class SeedError(Exception):
    """The seed file cannot be used; the message says why, in one line."""


def load_seed(path: Path = DEFAULT_SEED) -> Seed:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SeedError(f"cannot read the seed {path}: {exc}") from exc
    for template in raw.get("templates", []) if isinstance(raw, dict) else []:
        if isinstance(template, dict) and isinstance(template.get("image"), str):
            template["image"] = str(path.parent / template["image"])
    try:
        seed = Seed.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top)"
        raise SeedError(f"invalid seed {path}: {where}: {first['msg']}") from exc
    for template in seed.templates:
        if template.image is not None:
            try:
                image = inspect_image(template.image)
            except ImageError as exc:
                raise SeedError(f"invalid seed {path}: template {template.name}: {exc}") from exc
            if image.virtual_size > template.size:
                raise SeedError(
                    f"invalid seed {path}: template {template.name}: its image holds"
                    f" {image.virtual_size} bytes, more than its size {template.size}"
                )
    return seed
