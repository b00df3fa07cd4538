"""How the chain fails: deadlines, dependencies that are down, misspelt hooks, response-side changes."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import ClassVar

import pytest

from meshkit.errors import DependencyError
from meshkit.extproc import Exchange, Filter, Phase, Reply
from meshkit.extproc.chain import Chain
from meshkit.extproc.filter import hooks_of, lifecycle_of, safe_request_id


@dataclass(frozen=True)
class NoOptions:
    pass


class Sleeper(Filter):
    """Sets a header, then sleeps `seconds` (an async hook that may overrun the deadline)."""

    name: ClassVar[str] = "sleeper"
    Options: ClassVar[type] = NoOptions

    def __init__(self, seconds: float, *, fail_open: bool = False) -> None:
        super().__init__(NoOptions())
        self.seconds = seconds
        self.fail_open = fail_open  # type: ignore[misc]
        self.cancelled = False

    async def on_request_headers(self, exchange: Exchange) -> Reply | None:
        exchange.set_header("x-sleeper", "partial")
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return None


class Marker(Filter):
    name: ClassVar[str] = "marker"
    Options: ClassVar[type] = NoOptions

    def on_request_headers(self, exchange: Exchange) -> None:
        exchange.set_header("x-marker", "1")


async def test_an_async_hook_past_the_deadline_is_cancelled_and_answered_504() -> None:
    sleeper = Sleeper(5)
    chain = Chain([sleeper, Marker(NoOptions())], filter_timeout=0.05)
    ex = Exchange({})
    reply = await asyncio.wait_for(chain.run(Phase.REQUEST_HEADERS, ex), 2)
    assert reply is not None and reply.status == 504
    assert json.loads(reply.body)["error"]["type"] == "timeout"
    assert sleeper.cancelled
    assert ex.take_mutations() == ({}, set(), False)  # nothing of the abandoned round applies
    assert chain.metrics.timeouts["sleeper"] == 1


async def test_a_fail_open_filter_that_overruns_lets_the_request_through_without_its_changes() -> None:
    chain = Chain([Sleeper(5, fail_open=True), Marker(NoOptions())], filter_timeout=0.05)
    ex = Exchange({})
    assert await asyncio.wait_for(chain.run(Phase.REQUEST_HEADERS, ex), 2) is None
    assert ex.take_mutations() == ({"x-marker": "1"}, set(), False)  # x-sleeper's partial value is undone
    assert chain.metrics.timeouts["sleeper"] == 1


async def test_one_deadline_covers_both_phases_of_a_round() -> None:
    class TwoPhases(Filter):
        name: ClassVar[str] = "two"
        Options: ClassVar[type] = NoOptions

        async def on_request_headers(self, exchange: Exchange) -> None:
            await asyncio.sleep(0.06)

        async def on_request_body(self, exchange: Exchange) -> None:
            await asyncio.sleep(0.06)

    chain = Chain([TwoPhases(NoOptions())], filter_timeout=0.1)
    ex = Exchange({})
    chain.new_round(ex)
    assert await chain.run(Phase.REQUEST_HEADERS, ex) is None  # 0.06 s of 0.1
    reply = await chain.run(Phase.REQUEST_BODY, ex)  # 0.12 s in all: over
    assert reply is not None and reply.status == 504
    ex2 = Exchange({})
    chain.new_round(ex2)
    assert await chain.run(Phase.REQUEST_HEADERS, ex2) is None
    chain.new_round(ex2)  # ext_proc: every message is a round of its own
    assert await chain.run(Phase.REQUEST_BODY, ex2) is None


async def test_a_timeout_raised_by_the_hook_itself_is_a_failure_not_our_deadline() -> None:
    class OwnTimeout(Filter):
        name: ClassVar[str] = "own-timeout"
        Options: ClassVar[type] = NoOptions

        async def on_request_headers(self, exchange: Exchange) -> None:
            raise TimeoutError("the client library's own timeout")

    chain = Chain([OwnTimeout(NoOptions())], filter_timeout=5)
    reply = await chain.run(Phase.REQUEST_HEADERS, Exchange({}))
    assert reply is not None and reply.status == 500
    assert chain.metrics.timeouts["own-timeout"] == 0


class RedisDown(Filter):
    name: ClassVar[str] = "needs-redis"
    Options: ClassVar[type] = NoOptions

    async def on_request_headers(self, exchange: Exchange) -> None:
        raise DependencyError("redis", "connection refused", retry_after=3)


async def test_dependency_error_is_503_with_retry_after_one_line_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    chain = Chain([RedisDown(NoOptions())])
    with caplog.at_level(logging.WARNING):
        replies = [
            await chain.run(Phase.REQUEST_HEADERS, Exchange({"x-request-id": f"r{i}"})) for i in range(5)
        ]
    for reply in replies:
        assert reply is not None and reply.status == 503
        assert ("retry-after", "3") in reply.headers
        assert ("content-type", "application/json") in reply.headers
        assert json.loads(reply.body)["error"]["type"] == "service_unavailable"
    assert chain.metrics.dependency_errors == {"redis": 5}
    lines = [r for r in caplog.records if "redis is unavailable" in r.getMessage()]
    assert len(lines) == 1  # throttled: one line for the outage, the counter has every request
    assert lines[0].exc_info is None
    assert chain.metrics.errors == {}  # not counted as a filter bug


def test_a_misspelt_hook_is_a_start_up_error() -> None:
    class Typo(Filter):
        name: ClassVar[str] = "typo"
        Options: ClassVar[type] = NoOptions

        def on_request_header(self, exchange: Exchange) -> None:  # missing "s": would never run
            pass

    with pytest.raises(TypeError, match=r"on_request_header\(\) is not a phase hook"):
        Chain([Typo(NoOptions())])


def test_a_hook_with_the_wrong_signature_is_a_start_up_error() -> None:
    class Wrong:
        name = "wrong"

        def on_request_body(self) -> None:
            pass

    with pytest.raises(TypeError, match="takes one exchange"):
        hooks_of(Wrong)


def test_filter_base_defaults_are_not_hooks_and_start_close_are_found() -> None:
    class Quiet(Filter):
        name: ClassVar[str] = "quiet"
        Options: ClassVar[type] = NoOptions

        async def start(self) -> None:
            pass

    assert hooks_of(Quiet) == {}
    start, close = lifecycle_of(Quiet(NoOptions()))
    assert start is not None and close is None
    assert lifecycle_of(Marker(NoOptions())) == (None, None)


async def test_response_phases_change_response_headers_and_never_request_headers() -> None:
    class Stamp(Filter):
        name: ClassVar[str] = "stamp"
        Options: ClassVar[type] = NoOptions

        def on_response_headers(self, exchange: Exchange) -> None:
            exchange.set_response_header("X-Served-By", "meshkit")
            exchange.remove_response_header("server")

    class Confused(Filter):
        name: ClassVar[str] = "confused"
        Options: ClassVar[type] = NoOptions

        def on_response_headers(self, exchange: Exchange) -> None:
            exchange.set_header("x-too-late", "1")  # the request has gone upstream already

    ex = Exchange({})
    assert await Chain([Stamp(NoOptions())]).run(Phase.RESPONSE_HEADERS, ex) is None
    assert ex.take_mutations() == ({"x-served-by": "meshkit"}, {"server"}, False)
    reply = await Chain([Confused(NoOptions())]).run(Phase.RESPONSE_HEADERS, Exchange({}))
    assert reply is not None and reply.status == 500
    with pytest.raises(RuntimeError, match="use set_header"):
        Exchange({}).set_response_header("x", "1")  # request phase


@pytest.mark.parametrize(
    ("raw", "logged"),
    [
        ("abc-123_x.y:z", "abc-123_x.y:z"),
        ("evil\nINFO forged line", "evil_INFO_forged_line"),
        ("x" * 5000, "x" * 64 + "~"),
        ("", ""),
    ],
)
def test_a_client_chosen_request_id_is_bounded_before_it_reaches_a_log(raw: str, logged: str) -> None:
    assert Exchange({"x-request-id": raw}).request_id == logged
    assert safe_request_id(raw) == logged


class Wrapped(Filter):
    """A sync hook that returns its async helper's coroutine (what a decorator does, and what the
    hook's type `Reply | Awaitable[Reply | None] | None` allows)."""

    name: ClassVar[str] = "wrapped"
    Options: ClassVar[type] = NoOptions

    def __init__(self, seconds: float = 0, *, fail_open: bool = False) -> None:
        super().__init__(NoOptions())
        self.seconds = seconds
        self.fail_open = fail_open  # type: ignore[misc]

    async def _check(self, exchange: Exchange) -> Reply | None:
        exchange.set_header("x-wrapped", "partial")
        await asyncio.sleep(self.seconds)
        return Reply.error(403, "forbidden", "no") if exchange.headers.get("x-deny") else None

    def on_request_headers(self, exchange: Exchange) -> Awaitable[Reply | None]:
        return self._check(exchange)


async def test_a_sync_hook_that_returns_a_coroutine_is_awaited_under_the_deadline() -> None:
    reply = await Chain([Wrapped()]).run(Phase.REQUEST_HEADERS, Exchange({"x-deny": "1"}))
    assert reply is not None and reply.status == 403  # was: AttributeError out of chain.run
    ex = Exchange({})
    assert await Chain([Wrapped(), Marker(NoOptions())]).run(Phase.REQUEST_HEADERS, ex) is None
    assert ex.take_mutations()[0] == {"x-wrapped": "partial", "x-marker": "1"}
    chain = Chain([Wrapped(5)], filter_timeout=0.05)
    reply = await asyncio.wait_for(chain.run(Phase.REQUEST_HEADERS, Exchange({})), 2)
    assert reply is not None and reply.status == 504
    assert chain.metrics.timeouts["wrapped"] == 1


async def test_a_hook_that_returns_neither_a_reply_nor_none_is_the_filters_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class ReturnsTrue(Filter):
        name: ClassVar[str] = "returns-true"
        Options: ClassVar[type] = NoOptions

        def on_request_headers(self, exchange: Exchange) -> bool:  # type: ignore[override]
            return True

    class ReturnsDict(Filter):
        name: ClassVar[str] = "returns-dict"
        Options: ClassVar[type] = NoOptions

        async def on_request_headers(self, exchange: Exchange) -> dict[str, int]:  # type: ignore[override]
            return {"status": 403}

    for bad in (ReturnsTrue(NoOptions()), ReturnsDict(NoOptions())):
        chain = Chain([bad])
        with caplog.at_level(logging.ERROR):
            reply = await chain.run(Phase.REQUEST_HEADERS, Exchange({}))  # was: AttributeError
        assert reply is not None and reply.status == 500
        assert chain.metrics.errors == {f"filter:{bad.name}": 1}
        assert "not a Reply or None" in caplog.text


async def test_a_hook_that_turns_our_cancellation_into_its_own_error_has_overrun() -> None:
    """A client library may raise its own error when cancelled at the deadline (a ConnectionError):
    that is still the deadline, so a fail-open filter lets the request through (it was a 500)."""

    class Converts(Filter):
        name: ClassVar[str] = "converts"
        Options: ClassVar[type] = NoOptions
        fail_open: ClassVar[bool] = True

        async def on_request_headers(self, exchange: Exchange) -> None:
            exchange.set_header("x-partial", "1")
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                raise ConnectionError("connection closed") from None

    chain = Chain([Converts(NoOptions())], filter_timeout=0.05)
    ex = Exchange({})
    assert await asyncio.wait_for(chain.run(Phase.REQUEST_HEADERS, ex), 2) is None
    assert ex.take_mutations() == ({}, set(), False)
    assert chain.metrics.timeouts["converts"] == 1
    assert chain.metrics.errors == {}


async def test_static_and_class_method_hooks_are_hooks() -> None:
    """They take just the exchange: refused as "takes one exchange" before."""

    class Static(Filter):
        name: ClassVar[str] = "static"
        Options: ClassVar[type] = NoOptions

        @staticmethod
        def on_request_headers(exchange: Exchange) -> None:
            exchange.set_header("x-static", "1")

    class Klass(Filter):
        name: ClassVar[str] = "klass"
        Options: ClassVar[type] = NoOptions

        @classmethod
        async def on_request_body(cls, exchange: Exchange) -> None:
            exchange.set_header("x-class", cls.name)

    chain = Chain([Static(NoOptions()), Klass(NoOptions())])
    ex = Exchange({})
    assert await chain.run(Phase.REQUEST_HEADERS, ex) is None
    assert await chain.run(Phase.REQUEST_BODY, ex) is None
    assert ex.take_mutations()[0] == {"x-static": "1", "x-class": "klass"}

    class WrongStatic:
        name = "wrong-static"

        @staticmethod
        def on_request_body() -> None:
            pass

    with pytest.raises(TypeError, match="takes one exchange"):
        hooks_of(WrongStatic)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-model", "a\r\nx-injected: 1"),
        ("x-model", "nul\x00"),
        ("x-model", "del\x7f"),
        ("bad name", "v"),
        ("x:y", "v"),
        ("", "v"),
    ],
)
async def test_a_header_envoy_would_refuse_is_the_filters_500_on_every_path(name: str, value: str) -> None:
    class CopiesClientData(Filter):
        name: ClassVar[str] = "copier"
        Options: ClassVar[type] = NoOptions

        def on_request_body(self, exchange: Exchange) -> None:
            exchange.set_header(name, value)

    chain = Chain([CopiesClientData(NoOptions())])
    reply = await chain.run(Phase.REQUEST_BODY, Exchange({}))
    assert reply is not None and reply.status == 500
    assert json.loads(reply.body)["error"]["type"] == "internal_error"
    ok = Exchange({})
    ok.set_header("X-Model", "gpt-4o; q=1, \t tabs and UTF-8 é are fine")
    assert ok.take_mutations()[0] == {"x-model": "gpt-4o; q=1, \t tabs and UTF-8 é are fine"}


async def test_a_fail_open_filter_whose_dependency_is_down_lets_the_request_through_without_its_changes() -> (
    None
):
    class HalfDone(Filter):
        name: ClassVar[str] = "half-done"
        Options: ClassVar[type] = NoOptions
        fail_open: ClassVar[bool] = True

        async def on_request_headers(self, exchange: Exchange) -> None:
            exchange.set_header("x-half", "partial")
            raise DependencyError("redis", "connection refused")

    chain = Chain([HalfDone(NoOptions()), Marker(NoOptions())])
    ex = Exchange({})
    assert await chain.run(Phase.REQUEST_HEADERS, ex) is None
    assert ex.take_mutations() == ({"x-marker": "1"}, set(), False)  # x-half's partial value is undone
    assert chain.metrics.dependency_errors == {"redis": 1}
