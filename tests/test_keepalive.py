"""A request refused early (401, 404, 405, 413) does not end its keep-alive connection: the next
request on the same HTTP/1.1 connection is answered, on the OMA and on the VMA.

Each case drives one raw TCP connection with h11 (no client library that would quietly reconnect):
the refused request, then ``GET /api/v1/health`` on the same socket. A 413 comes in two forms: a
body over the limit sent whole, and a Content-Length over the limit whose body is still being
sent when the answer comes (the rest follows the answer).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from pyapp.vma_auth import sign
from tests.oma.oma_harness import Oma
from tests.vma.conftest import vma_config
from vma.api.errors import MAX_BODY_BYTES
from vma.server import serve_vma

CHUNK = 64 * 1024


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class RawHttp:
    """One HTTP/1.1 connection, driven by hand with h11."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.conn = h11.Connection(h11.CLIENT)

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def start(self, method: str, target: str, headers: dict[str, str], length: int | None) -> None:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        head = [("Host", self.host), *headers.items()]
        if length is not None:
            head.append(("Content-Length", str(length)))
        await self._send(h11.Request(method=method, target=target, headers=head))

    async def send_body(self, data: bytes) -> None:
        for i in range(0, len(data), CHUNK):
            await self._send(h11.Data(data=data[i : i + CHUNK]))

    async def end(self) -> None:
        await self._send(h11.EndOfMessage())

    async def answer(self) -> Answer:
        status = 0
        headers: dict[str, str] = {}
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(CHUNK)
                self.conn.receive_data(data)  # b"" marks the end of the connection
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return Answer(status, headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("the server closed the connection instead of answering")

    async def request(
        self, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> Answer:
        await self.start(method, target, headers or {}, len(body) if body or method != "GET" else None)
        await self.send_body(body)
        await self.end()
        return await self.answer()


#: The enrollment secret of a VMA configured without an OMA (tests/vma/conftest.py vma_config).
VMA_SECRET = "none"


@pytest.fixture
async def vma_url(tmp_path: Path, nursery: trio.Nursery) -> str:
    config = vma_config(tmp_path, None, None)
    url: str = await nursery.start(
        lambda task_status: serve_vma(config, handle_signals=False, task_status=task_status)
    )
    return url


async def connect(base_url: str) -> RawHttp:
    hostport = base_url.split("://", 1)[1].rstrip("/")
    host, port = hostport.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
    return RawHttp(stream, hostport)


async def assert_next_request_answered(http: RawHttp) -> None:
    assert http.conn.our_state is h11.DONE and http.conn.their_state is h11.DONE, (
        "the refused request's answer asked to close the connection"
    )
    nxt = await http.request("GET", "/api/v1/health")
    assert nxt.status == 200, nxt.body
    assert nxt.json()["status"] in ("healthy", "ok", "degraded"), nxt.body


def assert_envelope(answer: Answer, status: int) -> None:
    assert answer.status == status, (answer.status, answer.body[:300])
    assert "connection" not in answer.headers or answer.headers["connection"] != "close"
    body = answer.json()
    assert {"error", "code", "timestamp"} <= set(body), body


#: Fixed headers, or headers made for each request from its method, target and body (a signature).
Headers = dict[str, str] | Callable[[str, str, bytes], dict[str, str]]


def headers_for(headers: Headers, method: str, target: str, body: bytes) -> dict[str, str]:
    made = headers(method, target, body) if callable(headers) else headers
    return {"Content-Type": "application/json", **made}


async def refuse_and_continue(
    base_url: str, status: int, method: str, target: str, headers: Headers, body: bytes
) -> None:
    with trio.fail_after(10):
        http = await connect(base_url)
        answer = await http.request(method, target, headers_for(headers, method, target, body), body)
        assert_envelope(answer, status)
        await assert_next_request_answered(http)
        # and once more: a connection survives several early refusals in a row
        answer = await http.request(method, target, headers_for(headers, method, target, body), body)
        assert_envelope(answer, status)
        await assert_next_request_answered(http)
        await http.stream.aclose()


async def refuse_while_sending(base_url: str, target: str, headers: Headers, limit: int) -> None:
    """Content-Length over the limit: the 413 comes while the body is still being sent; the
    client then sends the rest of its body and the connection goes on."""
    total = limit + 4 * CHUNK
    first = b'{"name":"' + b"x" * (CHUNK - 9)
    whole = first + b"x" * (total - len(first))
    with trio.fail_after(10):
        http = await connect(base_url)
        await http.start("POST", target, headers_for(headers, "POST", target, whole), total)
        await http.send_body(first)
        answer = await http.answer()  # before the body is complete
        assert_envelope(answer, 413)
        await http.send_body(b"x" * (total - len(first)))
        await http.end()
        await assert_next_request_answered(http)
        await http.stream.aclose()


def _big(limit: int) -> bytes:
    return b'{"name":"' + b"x" * (limit + 1000) + b'"}'


async def test_oma_keeps_the_connection_after_early_refusals(oma_service: Oma) -> None:
    url, auth = oma_service.base_url, oma_service.auth
    limit = oma_service.config.max_body_bytes
    small = json.dumps({"name": "vm1", "extra": "y" * 2000}).encode()
    await refuse_and_continue(url, 401, "POST", "/api/v1/replications", {}, small)
    await refuse_and_continue(url, 401, "GET", "/api/v1/replications", {}, b"")
    await refuse_and_continue(url, 404, "POST", "/api/v1/no-such-thing", auth, small)
    await refuse_and_continue(url, 405, "PATCH", "/api/v1/replications", auth, small)
    await refuse_and_continue(url, 413, "POST", "/api/v1/vmware-credentials", auth, _big(limit))
    # an unknown path with a body over the limit: 404, and the body is not read
    await refuse_and_continue(url, 404, "POST", "/api/v1/no-such-thing", auth, _big(limit))
    await refuse_while_sending(url, "/api/v1/vmware-credentials", auth, limit)


async def test_vma_keeps_the_connection_after_early_refusals(vma_url: str) -> None:
    def signed(method: str, target: str, body: bytes) -> dict[str, str]:
        path, _, query = target.partition("?")
        return {"Authorization": sign(VMA_SECRET, method, path, query, body)}

    small = json.dumps({"job_id": "j1", "extra": "y" * 2000}).encode()
    await refuse_and_continue(vma_url, 401, "POST", "/api/v1/replicate", {}, small)
    await refuse_and_continue(vma_url, 401, "GET", "/api/v1/status/no-such-job", {}, b"")
    await refuse_and_continue(vma_url, 404, "POST", "/api/v1/no-such-thing", signed, small)
    await refuse_and_continue(vma_url, 404, "GET", "/api/v1/status/no-such-job", signed, b"")
    await refuse_and_continue(vma_url, 405, "PATCH", "/api/v1/replicate", signed, small)
    await refuse_and_continue(vma_url, 413, "POST", "/api/v1/replicate", signed, _big(MAX_BODY_BYTES))
    await refuse_while_sending(vma_url, "/api/v1/replicate", signed, MAX_BODY_BYTES)
