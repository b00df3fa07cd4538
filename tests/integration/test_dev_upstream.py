"""`meshkit dev-upstream` as a real process, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import base64
import json
import math
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from meshkit.harness.daemons import DevUpstream, dev_upstream
from meshkit.sidecars.fake_model import vector

from .conftest import request

pytestmark = pytest.mark.integration

MODEL = "text-embedding-3-small"


@pytest.fixture(scope="module")
def provider(workdir: Path) -> Iterator[DevUpstream]:
    with dev_upstream(workdir) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(provider: DevUpstream) -> None:
    """Every test starts with the flags' switches and zeroed stats."""
    provider.control(reset=True)
    provider.reset_stats()


@pytest.fixture
def client(provider: DevUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=provider.base_url, api_key="x", max_retries=0, timeout=30)


def _norm(values: list[float]) -> float:
    return math.sqrt(math.fsum(v * v for v in values))


# -- embeddings ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "items", "tokens"),
    [
        ("the quick brown fox", 1, 4),
        (["one", "two words", "three more words"], 3, 6),
        ([101, 7, 42], 1, 3),
        ([[1, 2], [3], [4, 5, 6]], 3, 6),
    ],
    ids=["string", "strings", "token-array", "token-arrays"],
)
def test_embeddings_in_each_input_form(
    client: openai.OpenAI,
    provider: DevUpstream,
    given: str | list[str] | list[int] | list[list[int]],
    items: int,
    tokens: int,
) -> None:
    answer = client.embeddings.create(model=MODEL, input=given, encoding_format="float")
    listed = [given] if isinstance(given, str) or isinstance(given[0], int) else given
    assert answer.object == "list"
    assert answer.model == MODEL
    assert [d.index for d in answer.data] == list(range(items))
    assert all(d.object == "embedding" and len(d.embedding) == 1536 for d in answer.data)
    assert all(abs(_norm(d.embedding) - 1.0) < 1e-5 for d in answer.data)
    assert (answer.usage.prompt_tokens, answer.usage.total_tokens) == (tokens, tokens)
    stats = provider.stats()
    assert stats["calls"]["embeddings"] == 1
    assert stats["embedding_items"] == items
    assert stats["embedding_batches"] == [items]
    (call,) = stats["embedding_calls"]
    assert call == {"model": MODEL, "dimensions": 1536, "input": listed}


def test_vectors_are_deterministic_and_match_the_documented_function(client: openai.OpenAI) -> None:
    first = client.embeddings.create(model=MODEL, input=["alpha", "beta", "alpha"], encoding_format="float")
    again = client.embeddings.create(model=MODEL, input="alpha", encoding_format="float")
    alpha, beta, alpha_2 = (d.embedding for d in first.data)
    assert alpha == alpha_2 == again.data[0].embedding
    assert alpha != beta
    assert alpha == vector(MODEL, 1536, "alpha")  # exact: a cache in front can be checked against it
    other_model = client.embeddings.create(
        model="text-embedding-ada-002", input="alpha", encoding_format="float"
    )
    assert other_model.data[0].embedding != alpha
    # a string and a token array are different items, whatever they look like
    tokens = client.embeddings.create(model=MODEL, input=[1], encoding_format="float")
    assert tokens.data[0].embedding != client.embeddings.create(model=MODEL, input="1").data[0].embedding


def test_dimensions_and_the_large_models_default(client: openai.OpenAI) -> None:
    small = client.embeddings.create(model=MODEL, input="x", dimensions=256, encoding_format="float")
    assert len(small.data[0].embedding) == 256
    assert abs(_norm(small.data[0].embedding) - 1.0) < 1e-5
    assert small.data[0].embedding == vector(MODEL, 256, "x")
    large = client.embeddings.create(model="text-embedding-3-large", input="x", encoding_format="float")
    assert len(large.data[0].embedding) == 3072


def test_base64_is_float32_little_endian_and_equals_the_float_answer(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=MODEL, input="same", encoding_format="float").data[0].embedding
    # asked explicitly for base64, the client hands back the string as sent
    text = client.embeddings.create(model=MODEL, input="same", encoding_format="base64").data[0].embedding
    assert isinstance(text, str)
    raw = base64.b64decode(text)
    assert len(raw) == 4 * 1536
    assert list(struct.unpack("<1536f", raw)) == floats
    # not asked, the client requests base64 itself and decodes it: the same numbers
    decoded = client.embeddings.create(model=MODEL, input="same").data[0].embedding
    assert decoded == floats


# -- chat ---------------------------------------------------------------------------------------
def test_chat_not_streamed(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is a cache tier"},
        ],
    )
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.content == "You said: what is a cache tier"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (7, 7)
    assert answer.usage.total_tokens == 14
    cut = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c d"}], max_tokens=2
    )
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("You said:", "length")
    assert cut.id != answer.id  # each answer its own id: a cached replay is told apart


def test_chat_streamed_with_usage_ends_with_a_usage_chunk(
    client: openai.OpenAI, provider: DevUpstream
) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "stream me four words"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "You said: stream me four words"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == 6  # token by token
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    *rest, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (4, 6, 10)
    assert all(c.usage is None for c in rest)
    assert provider.stats()["streams_completed"] == 1


def test_chat_streamed_without_usage_sends_none_as_openai_does(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_the_sse_wire_format(provider: DevUpstream) -> None:
    body = {
        "model": "gpt-4o",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "parts work"}]}],
    }
    resp = request(f"{provider.base_url}/chat/completions", body=json.dumps(body).encode())
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = resp.body.decode().split("\n\n")
    assert events[-1] == ""
    assert all(e.startswith("data: ") for e in events[:-1])
    assert events[-2] == "data: [DONE]"
    usage = json.loads(events[-3].removeprefix("data: "))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 2 + 4


def test_models_lists_the_names(client: openai.OpenAI) -> None:
    names = [m.id for m in client.models.list()]
    assert "text-embedding-3-small" in names and "gpt-4o-mini" in names


# -- switches ------------------------------------------------------------------------------------
def test_fail_switch_answers_429_for_the_next_calls_then_recovers(
    client: openai.OpenAI, provider: DevUpstream
) -> None:
    switches = provider.control(fail={"status": 429, "count": 2})
    assert switches["fail"] == {"status": 429, "count": 2, "retry_after": 1, "message": None}
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as raised:
            client.embeddings.create(model=MODEL, input="x")
        assert raised.value.status_code == 429
        assert raised.value.response.headers["retry-after"] == "1"
        assert raised.value.code == "rate_limit_exceeded"
    assert len(client.embeddings.create(model=MODEL, input="x").data) == 1
    stats = provider.stats()
    assert stats["calls"]["embeddings"] == 3
    assert stats["injected_failures"]["embeddings"] == 2
    assert stats["embedding_items"] == 1
    assert provider.control()["fail"] is None


def test_fail_switch_with_a_server_error_on_chat(client: openai.OpenAI, provider: DevUpstream) -> None:
    provider.control(fail={"status": 503, "retry_after": 7, "message": "overloaded"})
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert raised.value.status_code == 503
    assert raised.value.response.headers["retry-after"] == "7"
    assert raised.value.body == {"message": "overloaded", "type": "server_error", "param": None, "code": None}


def test_delay_switch_slows_every_model_call(client: openai.OpenAI, provider: DevUpstream) -> None:
    provider.control(delay_ms=500)
    began = time.monotonic()
    client.embeddings.create(model=MODEL, input="slow")
    assert 0.5 <= time.monotonic() - began < 5
    began = time.monotonic()
    request(f"{provider.url}/stats", method="GET")  # never delayed
    assert time.monotonic() - began < 0.4
    provider.control(reset=True)
    began = time.monotonic()
    client.embeddings.create(model=MODEL, input="fast")
    assert time.monotonic() - began < 0.4


def test_stream_delay_spaces_the_events(client: openai.OpenAI, provider: DevUpstream) -> None:
    provider.control(stream_delay_ms=50)
    began = time.monotonic()
    arrivals = []
    for _ in client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c"}], stream=True
    ):
        arrivals.append(time.monotonic() - began)
    assert len(arrivals) == 7  # role, 5 words, finish
    assert arrivals[-1] - arrivals[0] >= 6 * 0.05 * 0.9


def test_a_client_that_leaves_mid_stream_is_counted(provider: DevUpstream) -> None:
    provider.control(stream_delay_ms=100)
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "a b c d e"}]})
    with socket.create_connection(("127.0.0.1", provider.port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        seen = b""
        while b"data: " not in seen:  # the headers may come in a packet of their own
            chunk = sock.recv(65536)
            assert chunk, f"closed before the first event: {seen!r}"
            seen += chunk
    deadline = time.monotonic() + 5
    while provider.stats()["streams_abandoned"] != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert provider.stats()["streams_abandoned"] == 1
    assert provider.stats()["streams_completed"] == 0


def test_control_refuses_bad_switches_and_changes_nothing(provider: DevUpstream) -> None:
    for bad in ({"fail": {"status": 200}}, {"delay_ms": -1}, {"fail_rate": 2}, {"nope": 1}, {"fail": 3}):
        resp = request(f"{provider.url}/control", body=json.dumps({"delay_ms": 5, **bad}).encode())
        assert resp.status == 400, bad
        assert resp.json()["error"]["type"] == "invalid_request_error"
    assert provider.control()["delay_ms"] == 0


def test_fail_rate_flag_with_a_seed(tmp_path: Path) -> None:
    def outcomes() -> list[int]:
        with dev_upstream(tmp_path, ["--fail-rate", "0.5", "--seed", "7"], name="flaky") as flaky:
            body = json.dumps({"model": MODEL, "input": "x"}).encode()
            statuses = [request(f"{flaky.base_url}/embeddings", body=body).status for _ in range(20)]
            assert flaky.stats()["injected_failures"]["embeddings"] == statuses.count(500)
            metrics = request(f"{flaky.admin_url}/metrics", method="GET").body.decode()
            line = 'meshkit_dev_upstream_injected_failures_total{endpoint="embeddings",status="500"}'
            assert f"{line} {float(statuses.count(500))}" in metrics
        return statuses

    first = outcomes()
    assert set(first) == {200, 500}
    assert outcomes() == first  # the same seed, the same failures


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"input": "x"}', "model"),
        (b'{"model": "m"}', "input"),
        (b'{"model": "m", "input": ""}', "input"),
        (b'{"model": "m", "input": []}', "input"),
        (b'{"model": "m", "input": ["a", 1]}', "input"),
        (b'{"model": "m", "input": [[1], []]}', "input[1]"),
        (b'{"model": "m", "input": [-1]}', "input"),
        (b'{"model": "m", "input": "x", "encoding_format": "int8"}', "encoding_format"),
        (b'{"model": "m", "input": "x", "dimensions": 0}', "dimensions"),
        (b'{"model": "m", "input": "x", "dimensions": 99999}', "dimensions"),
        (b'{"model": "m", "input": "x", "temperature": 1}', "temperature"),
    ],
)
def test_bad_embedding_requests_get_openai_400s(
    provider: DevUpstream, body: bytes, param: str | None
) -> None:
    resp = request(f"{provider.base_url}/embeddings", body=body, headers={"content-type": "application/json"})
    assert resp.status == 400
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert "Traceback" not in resp.body.decode()
    assert provider.stats()["rejected"]["embeddings"] == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 1}]}, "messages[0].content"),
        (
            {"model": "m", "messages": [{"role": "user"}], "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ({"model": "m", "messages": [{"role": "user"}], "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_chat_requests_get_openai_400s(
    provider: DevUpstream, body: dict[str, object], param: str
) -> None:
    resp = request(f"{provider.base_url}/chat/completions", body=json.dumps(body).encode())
    assert resp.status == 400
    assert resp.json()["error"]["param"] == param


def test_bad_input_through_the_client_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model=MODEL, input="x", dimensions=0)
    assert raised.value.param == "dimensions"


def test_a_body_over_the_limit_is_413_and_an_unknown_path_404(tmp_path: Path) -> None:
    with dev_upstream(tmp_path, ["--max-body-bytes", "1KiB"], name="small") as small:
        resp = request(
            f"{small.base_url}/embeddings", body=json.dumps({"model": "m", "input": "x" * 2000}).encode()
        )
        assert resp.status == 413
        assert resp.json()["error"]["type"] == "invalid_request_error"
        assert request(f"{small.base_url}/embeddings", body=b'{"model": "m", "input": "ok"}').status == 200
        missing = request(f"{small.url}/v1/nope", body=b"{}")
        assert missing.status == 404
        assert missing.json()["error"]["message"] == "Invalid URL (POST /v1/nope)"
        wrong = request(f"{small.base_url}/embeddings", method="GET")
        assert wrong.status == 405 and "error" in wrong.json()


def test_unknown_models_are_refused_when_asked(tmp_path: Path) -> None:
    with dev_upstream(tmp_path, ["--models", "only-me", "--reject-unknown-models"], name="strict") as strict:
        client = openai.OpenAI(base_url=strict.base_url, api_key="x", max_retries=0)
        assert len(client.embeddings.create(model="only-me", input="x").data) == 1
        with pytest.raises(openai.NotFoundError) as raised:
            client.embeddings.create(model="text-embedding-3-small", input="x")
        assert raised.value.code == "model_not_found"


# -- the daemon --------------------------------------------------------------------------------------
def test_metrics_on_the_admin_port(client: openai.OpenAI, provider: DevUpstream) -> None:
    client.embeddings.create(model=MODEL, input=["a", "b"])
    metrics = request(f"{provider.admin_url}/metrics", method="GET").body.decode()
    assert 'meshkit_dev_upstream_requests_total{endpoint="embeddings",status="200"}' in metrics
    assert "meshkit_dev_upstream_embedding_items_total" in metrics
    assert request(f"{provider.admin_url}/readyz", method="GET").status == 200


def test_sigterm_exits_zero(tmp_path: Path) -> None:
    with dev_upstream(tmp_path, name="stopped") as running:
        assert request(f"{running.base_url}/models", method="GET").status == 200
        running.process.signal(signal.SIGTERM)
        assert running.process.wait(10) == 0
