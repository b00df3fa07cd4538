"""`meshkit sse` on real servers: a NATS origin with JetStream (domain `origin`) and a leaf; the adapter
connects to the LEAF, tokens are published into JetStream at the ORIGIN (as `meshkit bridge` does),
streams are read with a real HTTP client and parsed with the EventSource rules."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import nats
import pytest
from nats.js import JetStreamContext

from meshkit.edge.token_stream import ensure_stream
from meshkit.harness.edge_daemons import SseAdapter, sse_adapter
from meshkit.harness.nats import NatsServer, nats_server

from .conftest import request
from .test_sse_support import (
    SseReader,
    consumers_of,
    leaf_subscriptions,
    metric,
    open_stream,
    publish,
    settled,
    until,
)

pytestmark = pytest.mark.integration


def cid() -> str:
    return f"c-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sse")


@pytest.fixture(scope="module")
def origin(workdir: Path) -> Iterator[NatsServer]:
    with nats_server(workdir, name="sse-origin") as server:
        yield server


@pytest.fixture(scope="module")
def leaf(workdir: Path, origin: NatsServer) -> Iterator[NatsServer]:
    with nats_server(workdir, jetstream=False, leaf_remote=origin.leaf_url, name="sse-leaf") as server:
        origin.wait_for_leafnodes(1)
        yield server


@pytest.fixture(scope="module")
def stream_created(origin: NatsServer) -> None:
    async def create() -> None:
        nc = await nats.connect(origin.url)
        try:
            await ensure_stream(nc.jetstream())
        finally:
            await nc.close()

    asyncio.run(create())


ADAPTER_ARGS = [
    "--heartbeat",
    "0.5",
    "--client-queue",
    "256",
    "--consumer-heartbeat",
    "0.5",
    "--gap-timeout",
    "0.5",
]


@pytest.fixture(scope="module")
def adapter(workdir: Path, leaf: NatsServer, stream_created: None) -> Iterator[SseAdapter]:
    with sse_adapter(workdir, leaf.url, ADAPTER_ARGS) as running:
        yield running


@pytest.fixture(scope="module")
def small_history(workdir: Path, leaf: NatsServer, stream_created: None) -> Iterator[SseAdapter]:
    """An adapter keeping only 4 tokens per conversation in memory: older ones come from JetStream."""
    with sse_adapter(
        workdir, leaf.url, [*ADAPTER_ARGS, "--history", "4"], name="sse-small-history"
    ) as running:
        yield running


@pytest.fixture(scope="module")
def patient(workdir: Path, leaf: NatsServer, stream_created: None) -> Iterator[SseAdapter]:
    """An adapter with a long --gap-timeout: a viewer that waited for it shows."""
    args = [*ADAPTER_ARGS, "--gap-timeout", str(PATIENT_GAP_TIMEOUT)]
    with sse_adapter(workdir, leaf.url, args, name="sse-patient") as running:
        yield running


PATIENT_GAP_TIMEOUT = 5.0


async def dropped(adapter: SseAdapter) -> None:
    """Its viewers gone, `adapter` holds no subscription (the leaf's count in other tests is stable)."""
    await until(lambda: metric(adapter, "meshkit_sse_conversations_subscribed") == 0, what="unsubscribed")


@pytest.fixture
async def js(origin: NatsServer, stream_created: None) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(origin.url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


# -- the stream -------------------------------------------------------------------------------------
async def test_live_stream_end_to_end(
    adapter: SseAdapter, js: JetStreamContext, session: aiohttp.ClientSession
) -> None:
    c = cid()
    reader = await open_stream(session, adapter.stream_url(c))
    try:
        headers = reader.response.headers
        assert headers["Content-Type"].startswith("text/event-stream")
        assert headers["Cache-Control"] == "no-cache"
        assert headers["X-Accel-Buffering"] == "no"
        await reader.wait_for(lambda r: r.raw.startswith(b"retry: 1000\n\n"), what="retry hint first")
        await asyncio.sleep(0.3)  # the conversation has no tokens yet: heartbeats meanwhile
        await reader.wait_for(lambda r: b": hb\n\n" in r.raw, what="a heartbeat")
        await publish(js, c, range(1, 11), done_at=10, model="m1")
        await reader.until_end()
    finally:
        await reader.close()
    assert reader.sequences == list(range(1, 11))
    assert [e.event for e in reader.events] == ["token"] * 9 + ["done"]
    first = json.loads(reader.events[0].data)
    assert first["token"] == "t1 " and first["model"] == "m1" and first["conversation_id"] == c
    # the data is the published JSON, byte for byte
    assert b'data: {"conversation_id": "' + c.encode() + b'", "token": "t1 ", "sequence": 1' in reader.raw
    assert metric(adapter, "meshkit_sse_tokens_delivered_total") >= 10
    assert metric(adapter, "meshkit_sse_delivery_latency_seconds_count") >= 10


async def test_latency_is_observed_only_for_tokens_published_after_the_viewer_joined(
    adapter: SseAdapter, js: JetStreamContext, session: aiohttp.ClientSession
) -> None:
    """A viewer of an hour-old conversation gets it all, but its catch-up is not an hour of latency
    in meshkit_sse_delivery_latency_seconds (it was, for every resumed token)."""
    c = cid()
    await publish(js, c, range(1, 21), ts=time.time() - 3600)
    count = metric(adapter, "meshkit_sse_delivery_latency_seconds_count")
    total = metric(adapter, "meshkit_sse_delivery_latency_seconds_sum")
    reader = await open_stream(session, adapter.stream_url(c))
    try:
        await reader.wait_for(lambda r: len(r.sequences) >= 20, what="the old tokens")
        await publish(js, c, range(21, 31), done_at=30)
        await reader.until_end()
    finally:
        await reader.close()
    assert reader.sequences == list(range(1, 31))
    assert metric(adapter, "meshkit_sse_delivery_latency_seconds_count") - count >= 10  # the live ones
    assert metric(adapter, "meshkit_sse_delivery_latency_seconds_sum") - total < 60  # none hour-old


async def test_late_viewer_gets_everything_so_far_then_live(
    adapter: SseAdapter, js: JetStreamContext, session: aiohttp.ClientSession
) -> None:
    c = cid()
    await publish(js, c, range(0, 6))  # sequences may start at 0
    reader = await open_stream(session, adapter.stream_url(c))
    try:
        await reader.wait_for(lambda r: r.sequences == list(range(0, 6)), what="the stored tokens")
        await publish(js, c, range(6, 9), done_at=8)
        await reader.until_end()
    finally:
        await reader.close()
    assert reader.sequences == list(range(0, 9))
    assert not reader.of("reset")


@pytest.mark.parametrize("how", ["header", "query"])
async def test_resume_mid_stream_no_gap_no_duplicate(
    adapter: SseAdapter, js: JetStreamContext, session: aiohttp.ClientSession, how: str
) -> None:
    c = cid()
    first = await open_stream(session, adapter.stream_url(c))
    await publish(js, c, range(1, 6))
    await first.wait_for(lambda r: r.sequences == [1, 2, 3, 4, 5], what="first five")
    await first.close()  # the client drops; it had id 5
    await publish(js, c, range(6, 9))  # while it was away
    if how == "header":
        second = await open_stream(session, adapter.stream_url(c), {"Last-Event-ID": "5"})
    else:
        second = await open_stream(session, adapter.stream_url(c, last_event_id=5))
    try:
        await second.wait_for(lambda r: r.sequences == [6, 7, 8], what="the missed tokens")
        await publish(js, c, range(9, 12), done_at=11)
        await second.until_end()
    finally:
        await second.close()
    assert second.sequences == [6, 7, 8, 9, 10, 11]
    assert not second.of("reset")


async def test_resume_below_the_memory_log_replays_from_jetstream(
    small_history: SseAdapter, js: JetStreamContext, session: aiohttp.ClientSession
) -> None:
    c = cid()
    live = await open_stream(session, small_history.stream_url(c))  # keeps the conversation subscribed
    try:
        await publish(js, c, range(1, 13))
        await live.wait_for(lambda r: r.sequences == list(range(1, 13)), what="live viewer")
        replays = metric(small_history, "meshkit_sse_replays_total", '{result="ok"}')
        # the log holds 9..12 only: 3..8 come from JetStream, then the log, then live
        resumed = await open_stream(session, small_history.stream_url(c), {"Last-Event-ID": "2"})
        late = await open_stream(session, small_history.stream_url(c))
        await resumed.wait_for(lambda r: r.sequences == list(range(3, 13)), what="resumed viewer")
        await late.wait_for(lambda r: r.sequences == list(range(1, 13)), what="late viewer")
        await publish(js, c, range(13, 16), done_at=15)
        for reader in (live, resumed, late):
            await reader.until_end()
        assert resumed.sequences == list(range(3, 16))
        assert late.sequences == list(range(1, 16))
        assert not resumed.of("reset") and not late.of("reset")
        assert metric(small_history, "meshkit_sse_replays_total", '{result="ok"}') >= replays + 2
    finally:
        for reader in (live,):
            await reader.close()


async def test_tokens_stored_out_of_order_are_delivered_in_order_and_a_missing_one_is_a_reset(
    adapter: SseAdapter, js: JetStreamContext, session: aiohttp.ClientSession
) -> None:
    c = cid()
    reader = await open_stream(session, adapter.stream_url(c))
    try:
        await publish(js, c, [1, 2, 4, 3, 5])  # 4 stored before 3: held until 3 arrives
        await reader.wait_for(lambda r: r.sequences == [1, 2, 3, 4, 5], what="in order")
        await publish(js, c, [7, 8])  # 6 never comes: skipped after --gap-timeout, with a reset
        await reader.wait_for(lambda r: r.sequences == [1, 2, 3, 4, 5, 7, 8], within=5, what="after the gap")
        await publish(js, c, [9], done_at=9)
        await reader.until_end()
    finally:
        await reader.close()
    assert reader.sequences == [1, 2, 3, 4, 5, 7, 8, 9]
    resets = [json.loads(e.data) for e in reader.of("reset")]
    assert resets == [{"requested": 6, "available_from": 7}]
    # the reset comes right before 7
    names = [e.event if e.event != "token" else e.id for e in reader.events]
    assert names[names.index("reset") + 1] == "7"


async def test_token_0_stored_after_token_1_reaches_a_fresh_viewer_first_without_waiting(
    patient: SseAdapter, js: JetStreamContext, session: aiohttp.ClientSession
) -> None:
    """Two bridges in one consumer group may store token 1 before token 0: a viewer that comes later
    gets 0, 1, 2, ... (it lost 0 without a reset: the first token was taken as the start)."""
    c = cid()
    await publish(js, c, [1, 0])
    await publish(js, c, range(2, 6), done_at=5)
    began = time.monotonic()
    reader = await open_stream(session, patient.stream_url(c))
    try:
        await reader.until_end(within=PATIENT_GAP_TIMEOUT * 2)
    finally:
        await reader.close()
    took = time.monotonic() - began
    await dropped(patient)
    assert reader.sequences == [0, 1, 2, 3, 4, 5], bytes(reader.raw)
    assert not reader.of("reset")
    print(f"a fresh viewer of 1, 0, 2..5 read it all in {took:.3f} s (--gap-timeout {PATIENT_GAP_TIMEOUT})")
    assert took < PATIENT_GAP_TIMEOUT / 2  # the catch-up had no token 0 after it: nothing to wait for


@pytest.mark.parametrize("when", ["stored", "live"])
async def test_a_conversation_from_1_waits_for_no_gap_timeout_and_has_no_reset(
    patient: SseAdapter, js: JetStreamContext, session: aiohttp.ClientSession, when: str
) -> None:
    """Token 0 may come after token 1 (the test above), but a conversation starting at 1 is the common
    case: a fresh viewer of a stored one, or one there before it began, gets token 1 at once."""
    c = cid()
    if when == "stored":
        await publish(js, c, range(1, 21))
    began = time.monotonic()
    reader = await open_stream(session, patient.stream_url(c))
    try:
        if when == "live":
            await reader.wait_for(lambda r: r.raw.startswith(b"retry:"), what="the stream open")
            began = time.monotonic()
            await publish(js, c, range(1, 21))
        await reader.wait_for(lambda r: len(r.sequences) >= 1, within=PATIENT_GAP_TIMEOUT * 2)
        first = time.monotonic() - began
        await reader.wait_for(lambda r: len(r.sequences) >= 20, what="tokens 1-20")
    finally:
        await reader.close()
    await dropped(patient)
    assert reader.sequences == list(range(1, 21))
    assert not reader.of("reset")
    print(f"{when}: token 1 after {first:.3f} s (--gap-timeout {PATIENT_GAP_TIMEOUT})")
    assert first < PATIENT_GAP_TIMEOUT / 2


async def test_duplicates_stored_twice_are_sent_once(
    adapter: SseAdapter, js: JetStreamContext, session: aiohttp.ClientSession
) -> None:
    c = cid()
    subject = f"chat.{c}.tokens"
    reader = await open_stream(session, adapter.stream_url(c))
    try:
        await publish(js, c, [1, 2])
        # plain publishes (no Nats-Msg-Id) are stored again: the adapter must still send each once
        from .test_sse_support import token

        await js.publish(subject, token(c, 2))
        await js.publish(subject, token(c, 1))
        await publish(js, c, [3], done_at=3)
        await reader.until_end()
    finally:
        await reader.close()
    assert reader.sequences == [1, 2, 3]


# -- refused requests ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        "/stream/a.>",
        "/stream/*",
        "/stream/a.b",
        "/stream/%3E",
        "/stream/a%2Eb",
        "/stream/" + "x" * 129,
        "/stream/a%20b",
    ],
)
def test_subject_injection_is_400_and_subscribes_nothing(
    adapter: SseAdapter, leaf: NatsServer, path: str
) -> None:
    settled(adapter)
    before = leaf_subscriptions(leaf)
    bad = metric(adapter, "meshkit_sse_requests_total", '{result="bad_request"}')
    resp = request(adapter.url + path, "GET")
    assert resp.status == 400, resp.body
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert leaf_subscriptions(leaf) == before
    assert metric(adapter, "meshkit_sse_requests_total", '{result="bad_request"}') == bad + 1


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/stream/c1?last_event_id=abc", {}, 400),
        ("/stream/c1?last_event_id=-1", {}, 400),
        ("/stream/c1", {"Last-Event-ID": "1.5"}, 400),
        ("/stream/c1?last_event_id=9223372036854775808", {}, 400),  # above the upper bound (2**63 - 1)
        ("/stream/c1?format=xml", {}, 400),
        ("/nope", {}, 404),
        ("/stream", {}, 404),
        ("/stream/", {}, 404),
    ],
)
def test_bad_requests_answer_json(
    adapter: SseAdapter, path: str, headers: dict[str, str], status: int
) -> None:
    resp = request(adapter.url + path, "GET", headers=headers)
    assert resp.status == status, resp.body
    assert resp.json()["error"]["message"]


@pytest.mark.parametrize("where", ["header", "query"])
@pytest.mark.parametrize("digits", ["\u0661\u0662", "\uff11\uff12", "\u09e7\u09e8"])
def test_a_last_event_id_of_non_ascii_digits_is_400_json(
    adapter: SseAdapter, digits: str, where: str
) -> None:
    """Only [0-9]+: str.isdigit() takes Arabic-Indic, full-width or Bengali digits and int() reads
    them as 12, a resume from a sequence the client never had."""
    conn = http.client.HTTPConnection("127.0.0.1", adapter.port, timeout=10)
    try:
        if where == "header":
            conn.putrequest("GET", "/stream/c1")
            conn.putheader("Last-Event-ID", digits.encode())  # UTF-8 bytes on the wire
        else:
            conn.putrequest("GET", "/stream/c1?last_event_id=" + urllib.parse.quote(digits))
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read() if resp.status == 400 else b""  # a 200 is a stream: never ends
    finally:
        conn.close()
    assert resp.status == 400
    assert resp.getheader("content-type", "").startswith("application/json")
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error"
    assert ("Last-Event-ID" if where == "header" else "last_event_id") in error["message"]


def test_wrong_method_is_405_json(adapter: SseAdapter) -> None:
    resp = request(adapter.stream_url("c1"), "POST", body=b"{}")
    assert resp.status == 405
    assert resp.headers["allow"] == "GET"
    assert resp.json()["error"]["type"] == "method_not_allowed"


# -- sharing, slow clients ----------------------------------------------------------------------------
async def test_five_viewers_share_one_subscription_gone_after_they_leave(
    adapter: SseAdapter, leaf: NatsServer, js: JetStreamContext, session: aiohttp.ClientSession
) -> None:
    c = cid()
    settled(adapter)
    before = leaf_subscriptions(leaf)

    readers = [await open_stream(session, adapter.stream_url(c)) for _ in range(5)]
    try:
        await publish(js, c, range(1, 4))
        for reader in readers:
            await reader.wait_for(lambda r: r.sequences == [1, 2, 3], what="each viewer")
        during = leaf_subscriptions(leaf)
        assert len(during) == len(before) + 1, (before, during)
        assert f"chat.{c}.live" in during  # the stream republishes: a core subscription ...
        assert await consumers_of(js, c) == []  # ... and no consumer on the origin for it
        assert metric(adapter, "meshkit_sse_conversations_subscribed") >= 1
    finally:
        for reader in readers:
            await reader.close()
    await until(lambda: len(leaf_subscriptions(leaf)) == len(before), what="subscription dropped")


async def test_a_slow_client_is_cut_off_and_a_fast_one_gets_every_token_promptly(
    adapter: SseAdapter, js: JetStreamContext, session: aiohttp.ClientSession
) -> None:
    c = cid()
    # the slow client: sends its request, then never reads (the kernel absorbs 3-4 MB first)
    slow = socket.create_connection(("127.0.0.1", adapter.port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    slow.sendall(f"GET /stream/{c} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    fast = await open_stream(session, adapter.stream_url(c))
    drops = metric(adapter, "meshkit_sse_slow_client_drops_total")
    try:
        await until(lambda: metric(adapter, "meshkit_sse_open_streams") >= 2, what="both streams open")
        pad = "x" * 4000
        count = 2000  # 8 MB
        began = time.monotonic()
        await publish(js, c, range(1, count + 1), done_at=count, text=pad)
        published = time.monotonic()
        await fast.until_end(within=20)
        got_all = time.monotonic()
        assert fast.sequences == list(range(1, count + 1))
        assert got_all - published < 2.0, (
            f"fast viewer finished {got_all - published:.2f} s after the last publish"
        )
        await until(
            lambda: metric(adapter, "meshkit_sse_slow_client_drops_total") == drops + 1, what="slow cut off"
        )
        # the slow client's connection was dropped: reading it now ends (after what the kernel held)
        slow.settimeout(5)
        received = 0
        try:
            while chunk := slow.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert 0 < received < count * 4000, received
        print(f"publish {published - began:.2f} s, fast +{got_all - published:.3f} s, slow got {received} B")
    finally:
        slow.close()
        await fast.close()
    assert "slow client" in adapter.process.log_text()


async def test_a_slow_client_cut_off_resumes_with_last_event_id_and_gets_every_token_once(
    adapter: SseAdapter, js: JetStreamContext, session: aiohttp.ClientSession
) -> None:
    """The slow client is an aiohttp response nobody reads (aiohttp stops reading its socket, the
    kernel buffers fill, the adapter's queue of --client-queue 256 overflows); after the cut it reads
    what it had, and resumes from the last id it parsed, as an EventSource would."""
    c = cid()
    drops = metric(adapter, "meshkit_sse_slow_client_drops_total")
    response = await session.get(
        adapter.stream_url(c), timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)
    )
    assert response.status == 200
    count = 4000  # 16 MB: more than the socket buffers (up to 32 MB of rmem here, autotuned) hold
    try:
        await until(lambda: metric(adapter, "meshkit_sse_open_streams") >= 1, what="the stream open")
        await publish(js, c, range(1, count + 1), done_at=count, text="z" * 4000)
        await until(
            lambda: metric(adapter, "meshkit_sse_slow_client_drops_total") == drops + 1,
            within=20,
            what="the slow client cut off",
        )
        slow = SseReader(response)  # now it reads: what reached it, then the end of the connection
        await slow.until_end(within=10)
    finally:
        response.close()
    assert slow.sequences == list(range(1, len(slow.sequences) + 1)), "in order, each once, until the cut"
    assert 0 < len(slow.sequences) < count
    last = slow.sequences[-1]
    resumed = await open_stream(session, adapter.stream_url(c), {"Last-Event-ID": str(last)})
    try:
        await resumed.until_end(within=20)
    finally:
        await resumed.close()
    print(f"cut off after {last} of {count} tokens; the resume got {len(resumed.sequences)}")
    assert slow.sequences + resumed.sequences == list(range(1, count + 1))
    assert not resumed.of("reset") and resumed.events[-1].event == "done"


async def test_healthz_answers(adapter: SseAdapter) -> None:
    resp = request(adapter.admin_url + "/healthz", "GET")
    assert resp.status == 200, resp.body


# -- limits and shutdown ------------------------------------------------------------------------------
async def test_max_connections_answers_503_beyond_it(
    workdir: Path, leaf: NatsServer, stream_created: None, session: aiohttp.ClientSession
) -> None:
    with sse_adapter(workdir, leaf.url, ["--max-connections", "2"], name="sse-max2") as small:
        a = await open_stream(session, small.stream_url("m1"))
        b = await open_stream(session, small.stream_url("m2"))
        resp = request(small.stream_url("m3"), "GET")
        assert resp.status == 503
        assert resp.headers["retry-after"] == "1"
        assert resp.json()["error"]["type"] == "over_capacity"
        await a.close()
        await until(lambda: metric(small, "meshkit_sse_open_streams") == 1, what="one stream left")
        c = await open_stream(session, small.stream_url("m3"))
        await b.close()
        await c.close()


async def test_sigterm_tells_every_open_stream_to_reconnect(
    workdir: Path, leaf: NatsServer, js: JetStreamContext, session: aiohttp.ClientSession
) -> None:
    c = cid()
    args = ["--heartbeat", "0.5", "--drain-delay", "1"]
    with sse_adapter(workdir, leaf.url, args, name="sse-sigterm") as doomed:
        readers = [await open_stream(session, doomed.stream_url(c)) for _ in range(2)]
        resumed = await open_stream(session, doomed.stream_url(c, last_event_id=1))
        await publish(js, c, [1, 2])
        for reader in readers:
            await reader.wait_for(lambda r: r.sequences == [1, 2])
        began = time.monotonic()
        doomed.process.signal(signal.SIGTERM)
        # readiness goes off first; the streams are still open during --drain-delay
        await until(lambda: request(doomed.admin_url + "/readyz", "GET").status == 503, what="not ready")
        assert not any(r.ended.is_set() for r in readers)
        for reader in [*readers, resumed]:
            await reader.until_end(within=5)
            assert reader.events[-1].event == "reconnect"
            assert reader.events[-1].retry == 250
        assert doomed.process.wait(10) == 0
        assert time.monotonic() - began < 5
    assert resumed.sequences == [2]


async def test_sigterm_ends_an_openai_stream_with_an_error_the_openai_client_raises(
    workdir: Path, leaf: NatsServer, adapter: SseAdapter, js: JetStreamContext
) -> None:
    """Ending cleanly without `[DONE]` made OpenAI's client return the tokens so far as the whole
    answer; the error it raises now says where to resume (?last_event_id=), here on another adapter."""
    import openai
    from openai.types.chat import ChatCompletionChunk

    def read(url: str, got: list[ChatCompletionChunk], **params: object) -> openai.APIError | None:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=10)
        stream = client.get(
            f"/stream/{c}",
            cast_to=ChatCompletionChunk,
            options={"params": {"format": "openai", **params}},
            stream=True,
            stream_cls=openai.Stream[ChatCompletionChunk],
        )
        try:
            got.extend(stream)
        except openai.APIError as exc:
            return exc
        return None

    c = cid()
    got: list[ChatCompletionChunk] = []
    with sse_adapter(workdir, leaf.url, ["--drain-delay", "0.2"], name="sse-sigterm-openai") as doomed:
        reading = asyncio.ensure_future(asyncio.to_thread(read, doomed.url, got))
        await until(lambda: metric(doomed, "meshkit_sse_open_streams") == 1, what="the client's stream")
        await publish(js, c, [1, 2])
        await until(lambda: len(got) == 2, what="two chunks")
        doomed.process.signal(signal.SIGTERM)
        raised = await asyncio.wait_for(reading, 10)
        assert doomed.process.wait(10) == 0
    assert isinstance(raised, openai.APIError), f"{len(got)} chunks returned as if they were the answer"
    assert isinstance(raised.body, dict)
    assert (raised.body["type"], raised.body["code"]) == ("reconnect", "server_shutdown")
    assert raised.body["last_event_id"] == 2
    await publish(js, c, [3, 4], done_at=4)
    rest: list[ChatCompletionChunk] = []
    last = raised.body["last_event_id"]
    assert await asyncio.to_thread(read, adapter.url, rest, last_event_id=last) is None
    assert "".join(ch.choices[0].delta.content or "" for ch in got + rest) == "t1 t2 t3 t4 "
    assert [(ch.model_extra or {}).get("x_sequence") for ch in got + rest] == [1, 2, 3, 4, 4]


async def test_resume_after_the_done_token_ends_at_once(
    adapter: SseAdapter, js: JetStreamContext, session: aiohttp.ClientSession
) -> None:
    c = cid()
    await publish(js, c, [1, 2, 3], done_at=3)
    reader = await open_stream(session, adapter.stream_url(c), {"Last-Event-ID": "3"})
    try:
        await reader.until_end(within=5)
    finally:
        await reader.close()
    assert reader.events == []
    assert bytes(reader.raw) == b"retry: 1000\n\n"


async def test_readyz_and_metrics(adapter: SseAdapter) -> None:
    resp = request(adapter.admin_url + "/readyz", "GET")
    assert resp.status == 200, resp.body
    resp = request(adapter.admin_url + "/metrics", "GET")
    text = resp.body.decode()
    for name in (
        "meshkit_sse_open_streams",
        "meshkit_sse_conversations_subscribed",
        "meshkit_sse_tokens_delivered_total",
        "meshkit_sse_delivery_latency_seconds_bucket",
        "meshkit_sse_slow_client_drops_total",
        "meshkit_sse_resets_total",
    ):
        assert name in text, name


# -- OpenAI format --------------------------------------------------------------------------------------
async def test_openai_format_read_by_the_openai_client(adapter: SseAdapter, js: JetStreamContext) -> None:
    import openai
    from openai.types.chat import ChatCompletionChunk

    c = cid()
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    await publish(js, c, range(1, 3), model="gpt-test")  # two before the client comes, one after

    def read() -> list[ChatCompletionChunk]:
        client = openai.OpenAI(base_url=adapter.url, api_key="unused", max_retries=0, timeout=10)
        stream = client.get(
            f"/stream/{c}",
            cast_to=ChatCompletionChunk,
            options={"params": {"format": "openai"}},
            stream=True,
            stream_cls=openai.Stream[ChatCompletionChunk],
        )
        return list(stream)

    streams = metric(adapter, "meshkit_sse_open_streams")
    reading = asyncio.ensure_future(asyncio.to_thread(read))
    await until(lambda: metric(adapter, "meshkit_sse_open_streams") > streams, what="the client's stream")
    await asyncio.sleep(1.2)  # two heartbeat comments (--heartbeat 0.5) go through the client's parser
    await publish(js, c, [3], model="gpt-test")
    await js.publish(
        f"chat.{c}.tokens",
        json.dumps({"conversation_id": c, "token": "", "sequence": 4, "done": True, "usage": usage}).encode(),
    )
    chunks = await asyncio.wait_for(reading, 15)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "t1 t2 t3 "
    assert [ch.choices[0].finish_reason for ch in chunks] == [None, None, None, "stop"]
    assert {ch.model for ch in chunks} == {"gpt-test"}
    assert {ch.id for ch in chunks} == {f"chatcmpl-{c}"}
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 7
    assert [(ch.model_extra or {}).get("x_sequence") for ch in chunks] == [1, 2, 3, 4]

    def resume() -> list[ChatCompletionChunk]:
        client = openai.OpenAI(base_url=adapter.url, api_key="unused", max_retries=0, timeout=10)
        stream = client.get(
            f"/stream/{c}",
            cast_to=ChatCompletionChunk,
            options={"params": {"format": "openai", "last_event_id": 2}},
            stream=True,
            stream_cls=openai.Stream[ChatCompletionChunk],
        )
        return list(stream)

    again = await asyncio.to_thread(resume)
    assert "".join(ch.choices[0].delta.content or "" for ch in again) == "t3 "


# -- start-up -------------------------------------------------------------------------------------------
def test_unreachable_nats_at_start_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there
    argv = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--nats", f"nats://127.0.0.1:{port}"]
    done = subprocess.run(
        [sys.executable, "-m", "meshkit", "sse", *argv, "--start-timeout", "3"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "nats did not start" in done.stderr.splitlines()[-1]
    assert "not reachable yet: ConnectionRefusedError" in done.stderr


def test_bad_options_are_exit_2_all_at_once() -> None:
    argv = ["--history", "0", "--heartbeat", "0", "--stream", "a.b", "--max-connections", "x"]
    done = subprocess.run(
        [sys.executable, "-m", "meshkit", "sse", *argv], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done.stderr
    for name in ("--max-connections", "--history", "--heartbeat", "--stream"):
        assert name in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_client_that_stops_reading_is_cut_off_after_the_write_timeout(
    workdir: Path, leaf: NatsServer, js: JetStreamContext, session: aiohttp.ClientSession
) -> None:
    c = cid()
    args = ["--client-queue", "100000", "--write-timeout", "1"]  # the lag bound never applies here
    with sse_adapter(workdir, leaf.url, args, name="sse-write-timeout") as adapter:
        stalled = socket.create_connection(("127.0.0.1", adapter.port))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        stalled.sendall(f"GET /stream/{c} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        try:
            await until(lambda: metric(adapter, "meshkit_sse_open_streams") == 1, what="stream open")
            await publish(js, c, range(1, 121), text="y" * 60_000)  # 7 MB, then nothing more
            await until(lambda: metric(adapter, "meshkit_sse_slow_client_drops_total") == 1, within=10)
            await until(lambda: metric(adapter, "meshkit_sse_open_streams") == 0, what="stream closed")
        finally:
            stalled.close()
        assert "stalled client: a write blocked for 1 s" in adapter.process.log_text()
