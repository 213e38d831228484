"""The JSON log lines and the in-memory ring (``/debug/logs``) never carry a secret handed to the
logger by mistake: under a secret's field name, inside a message, an exception or a nested value."""

from __future__ import annotations

import io
import json
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pyapp.logs import JsonFormatter, RecentRecords

REDACTED = "[redacted]"


@dataclass(frozen=True)
class Login:  # a dataclass whose repr shows its password, as a careless caller's would
    username: str
    password: str


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO, RecentRecords]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    ring = RecentRecords(100)
    log = logging.getLogger(f"test.redaction.{secrets.token_hex(4)}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    log.addHandler(handler)
    log.addHandler(ring)
    yield log, stream, ring
    log.removeHandler(handler)
    log.removeHandler(ring)


def test_secrets_given_to_the_logger_are_redacted(
    logged: tuple[logging.Logger, io.StringIO, RecentRecords],
) -> None:
    log, stream, ring = logged
    s = [f"S{i}x{secrets.token_urlsafe(10).replace('-', 'a').replace('_', 'b')}" for i in range(10)]
    log.info(
        "fields",
        extra={
            "password": s[0],
            "new_password": s[1],
            "headers": {"Authorization": f"Bearer {s[2]}", "Accept": "application/json"},
            "oma_secret": s[3],
            "nested": [{"access_token": s[4]}],
            "token_id": "tok-1",
            "password_changed": True,
            "vcenter": "https://vc.example/sdk",
        },
    )
    log.warning("mount failed: %s", f"-o credentials=/run/x,username=u,password={s[5]},vers=3.0")
    log.info("connecting to %s", f"https://administrator:{s[6]}@vc.example/sdk")
    log.info("login %s", Login("u", s[7]))
    log.info("request %s", {"username": "u", "password": s[8]})
    try:
        raise RuntimeError(f'vCenter said: {{"password": "{s[9]}"}} is wrong')
    except RuntimeError:
        log.exception("login failed")

    lines = stream.getvalue()
    served = json.dumps(ring.snapshot(limit=100))
    for value in s:
        assert value not in lines, (value, lines)
        assert value not in served, (value, served)
    first = json.loads(lines.splitlines()[0])
    assert first["password"] == REDACTED and first["new_password"] == REDACTED
    assert first["headers"] == {"Authorization": REDACTED, "Accept": "application/json"}
    assert first["nested"] == [{"access_token": REDACTED}]
    # identifiers and facts about secrets stay
    assert first["token_id"] == "tok-1" and first["password_changed"] is True
    assert first["vcenter"] == "https://vc.example/sdk"
    records = [json.loads(line) for line in lines.splitlines()]
    assert records[1]["message"] == (
        f"mount failed: -o credentials=/run/x,username=u,password={REDACTED},vers=3.0"
    )
    assert records[2]["message"] == f"connecting to https://administrator:{REDACTED}@vc.example/sdk"
    assert records[3]["message"] == f"login Login(username='u', password='{REDACTED}')"
    assert records[4]["message"] == f"request {{'username': 'u', 'password': '{REDACTED}'}}"
    assert "RuntimeError" in records[5]["exception"] and REDACTED in records[5]["exception"]


def test_ordinary_text_is_left_alone(logged: tuple[logging.Logger, io.StringIO, RecentRecords]) -> None:
    log, stream, _ = logged
    texts = [
        "the current password is wrong",
        "token issued",
        "VMware credential updated",
        "vCenter http://127.0.0.1:33517/sdk refused the login of user",
        "copied /DC0/vm/vm1 disk-203: 53248 bytes written",
        "cannot read secret file /etc/vma/oma.secret: No such file or directory",
    ]
    for text in texts:
        log.info("%s", text)
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == texts
