from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import pytest

from meshkit.errors import ClientError
from meshkit.extproc.chain import Chain
from meshkit.extproc.filter import Exchange, Phase, Reply


@dataclass(frozen=True)
class NoOptions:
    pass


class Recorder:
    """A filter that records the hooks it saw and does what its constructor says."""

    Options: ClassVar[type] = NoOptions

    def __init__(
        self,
        name: str,
        log: list[str],
        *,
        header: str | None = None,
        reply_in: Phase | None = None,
        raise_in: Phase | None = None,
        error: Exception | None = None,
    ) -> None:
        self.name = name
        self.log = log
        self.header = header
        self.reply_in = reply_in
        self.raise_in = raise_in
        self.error = error

    def _hook(self, phase: Phase, ex: Exchange) -> Reply | None:
        self.log.append(f"{self.name}:{phase.value}:{ex.header('x-seen')}")
        if self.header:
            ex.set_header("x-seen", self.header)
        if phase is self.raise_in:
            raise self.error or RuntimeError("boom")
        if phase is self.reply_in:
            return Reply.error(403, "forbidden", f"{self.name} says no")
        return None

    def on_request_headers(self, ex: Exchange) -> Reply | None:
        return self._hook(Phase.REQUEST_HEADERS, ex)

    def on_request_body(self, ex: Exchange) -> Reply | None:
        return self._hook(Phase.REQUEST_BODY, ex)

    def on_response_headers(self, ex: Exchange) -> Reply | None:
        return self._hook(Phase.RESPONSE_HEADERS, ex)


class AsyncFilter:
    name: ClassVar[str] = "async"
    Options: ClassVar[type] = NoOptions

    async def on_request_body(self, ex: Exchange) -> Reply | None:
        ex.set_header("x-async", "yes")
        return None


async def test_hooks_run_in_order_and_see_earlier_changes() -> None:
    log: list[str] = []
    chain = Chain([Recorder("a", log, header="from-a"), Recorder("b", log)])
    ex = Exchange({})
    assert await chain.run(Phase.REQUEST_HEADERS, ex) is None
    assert log == ["a:request_headers:None", "b:request_headers:from-a"]
    assert ex.take_mutations() == ({"x-seen": "from-a"}, set(), False)


def test_phases_come_from_the_hooks_filters_have() -> None:
    chain = Chain([AsyncFilter()])
    assert chain.phases == {Phase.REQUEST_BODY}
    assert Chain([Recorder("a", [])]).phases == {
        Phase.REQUEST_HEADERS,
        Phase.REQUEST_BODY,
        Phase.RESPONSE_HEADERS,
    }


async def test_first_reply_stops_the_chain_and_drops_pending_changes() -> None:
    log: list[str] = []
    chain = Chain([Recorder("a", log, header="x", reply_in=Phase.REQUEST_HEADERS), Recorder("b", log)])
    ex = Exchange({})
    reply = await chain.run(Phase.REQUEST_HEADERS, ex)
    assert reply is not None and reply.status == 403
    assert log == ["a:request_headers:None"]
    assert ex.take_mutations() == ({}, set(), False)
    # Later phases, response phases included, run no hook and return the same reply.
    assert await chain.run(Phase.RESPONSE_HEADERS, ex) is reply
    assert log == ["a:request_headers:None"]


async def test_client_error_becomes_reply() -> None:
    err = ClientError(429, "rate_limited", "slow down", code="rpm")
    chain = Chain([Recorder("a", [], raise_in=Phase.REQUEST_BODY, error=err)])
    reply = await chain.run(Phase.REQUEST_BODY, Exchange({}))
    assert reply == Reply.error(429, "rate_limited", "slow down", "rpm")
    assert reply.headers == (("content-type", "application/json"),)


async def test_unexpected_exception_fails_closed_with_500(caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    chain = Chain([Recorder("a", log, raise_in=Phase.REQUEST_HEADERS), Recorder("b", log)])
    ex = Exchange({"x-request-id": "req-1"})
    with caplog.at_level(logging.ERROR):
        reply = await chain.run(Phase.REQUEST_HEADERS, ex)
    assert reply is not None and reply.status == 500
    assert b"boom" not in reply.body  # no internals to the client
    assert log == ["a:request_headers:None"]  # b never ran: the failed filter was not skipped over
    record = caplog.records[-1]
    assert record.exc_info is not None
    assert (record.filter, record.request_id) == ("a", "req-1")  # type: ignore[attr-defined]


async def test_async_and_sync_hooks_mix() -> None:
    log: list[str] = []
    chain = Chain([Recorder("a", log, header="1"), AsyncFilter()])
    ex = Exchange({})
    assert await chain.run(Phase.REQUEST_BODY, ex) is None
    assert ex.take_mutations()[0] == {"x-seen": "1", "x-async": "yes"}


def test_duplicate_filter_names_are_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        Chain([Recorder("a", []), Recorder("a", [])])


def test_set_then_remove_and_remove_then_set() -> None:
    ex = Exchange({"x-a": "client"})
    ex.set_header("X-A", "1")
    ex.remove_header("x-a")
    assert ex.header("x-a") is None
    ex.remove_header("x-b")
    ex.set_header("x-b", "2")
    ex.clear_route_cache()
    assert ex.take_mutations() == ({"x-b": "2"}, {"x-a"}, True)
    assert ex.take_mutations() == ({}, set(), False)
