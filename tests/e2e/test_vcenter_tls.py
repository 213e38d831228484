"""vCenter TLS end to end: a credential's ``tls_mode`` goes from the OMA through the real VMA to
a vCenter (the lab) serving HTTPS with its self-signed certificate."""

from __future__ import annotations

import logging

import pytest

from lab import Lab
from tests.e2e.conftest import Product


async def _test(product: Product, tls_lab: Lab, name: str, **tls: str) -> dict[str, object]:
    body = {
        "credential_name": name,
        "vcenter_host": tls_lab.url,
        "username": tls_lab.username,
        "password": tls_lab.password,
        "datacenter": "DC0",
        **tls,
    }
    r = await product.oma.post("/vmware-credentials", json=body)
    assert r.status_code == 201, r.text
    cred: dict[str, object] = r.json()
    r = await product.oma.post(f"/vmware-credentials/{cred['id']}/test")
    assert r.status_code == 200, r.text
    result: dict[str, object] = {**cred, **r.json()}
    return result


async def test_the_credentials_tls_mode_decides_how_the_vma_checks_vcenter(
    product: Product, tls_lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    verify = await _test(product, tls_lab, "tls-verify")
    assert verify["tls_mode"] == "verify" and verify["success"] is False
    assert "TLS certificate verification failed" in str(verify["message"])

    wrong = await _test(
        product, tls_lab, "tls-wrong", tls_mode="thumbprint", tls_thumbprint=":".join(["00"] * 32)
    )
    assert wrong["success"] is False and "TLS thumbprint mismatch" in str(wrong["message"])
    assert tls_lab.thumbprint() in str(wrong["message"])

    pin = tls_lab.thumbprint()
    pinned = await _test(product, tls_lab, "tls-pinned", tls_mode="thumbprint", tls_thumbprint=pin)
    assert pinned["success"] is True, pinned["message"]

    with caplog.at_level(logging.WARNING):
        lax = await _test(product, tls_lab, "tls-lax", tls_mode="insecure")
    assert lax["tls_mode"] == "insecure" and lax["success"] is True, lax["message"]
    vma_warnings = [
        r for r in caplog.records if r.name == "vma.vsphere.client" and "TLS verification" in r.getMessage()
    ]
    assert vma_warnings and all(tls_lab.url in r.getMessage() for r in vma_warnings)
    oma_warnings = [
        r for r in caplog.records if r.name == "oma.credentials.vmware" and r.levelno == logging.WARNING
    ]
    assert oma_warnings and all(tls_lab.url in r.getMessage() for r in oma_warnings)
