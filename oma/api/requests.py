"""Request parsing shared by the blueprints: the bases of request models (:class:`RequestModel`:
unknown fields refused; :class:`QueryModel`: no NUL characters; :class:`PageQuery`: a page of a
list), :data:`SerialId` (an id the database can hold), the caller's address, and the shield that
keeps a short transaction from being cut short by a client hanging up."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Annotated, Any

import trio
from pydantic import BaseModel, Field, model_validator
from quart import Response, request

from oma.store.pages import Page
from pyapp.api import RequestModel as RequestModel
from pyapp.http_limits import SERIAL_MAX

MAX_NAME = 255
MAX_TEXT = 4096
#: An integer id of a row (a PostgreSQL ``serial``).
SerialId = Annotated[int, Field(ge=1, le=SERIAL_MAX)]


class QueryModel(BaseModel):
    """The base of query-string models: a NUL character in any parameter is refused (400), as
    PostgreSQL cannot hold one."""

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and any("\x00" in f"{k}{v}" for k, v in data.items()):
            raise ValueError("a query parameter contains a NUL character")
        return data


class PageQuery(QueryModel, Page):
    """``?limit=&offset=`` of every list, parsed into the :class:`~oma.store.pages.Page` the
    domains take."""


def json_response(body: str) -> Response:
    """A JSON document the database already rendered (:func:`oma.store.pages.json_page`)."""
    return Response(body, content_type="application/json")


def client_ip() -> str | None:
    return request.remote_addr


@contextlib.contextmanager
def not_cut_short() -> Iterator[None]:
    """Shield a short transaction from the request's cancellation (hypercorn cancels a handler
    whose client hung up, e.g. the VMA's progress report cut off by the end of its job). A query
    cancelled half-way leaves its pooled connection inside the transaction, holding the job row's
    lock, and every later update of that job waits for it."""
    with trio.CancelScope(shield=True):
        yield
