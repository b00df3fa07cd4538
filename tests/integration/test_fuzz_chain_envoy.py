"""Fuzzed JSON bodies and headers through a real Envoy into the full chain (auth, body-hash,
model-router), on all three paths: 1,200 cases per path that must never crash, hang or 5xx the server.

Each case is a random request: a body that is JSON of random shape (nested, odd unicode, huge numbers,
duplicate keys, `model` of every type, `stream` of every type) or random bytes, and random headers
(valid, invalid and spoofed credentials, x-auth-*, x-model, odd bytes). What must hold:

- every answer is one of the statuses the chain can decide (200/400/401/403/404/413), never a 5xx;
- every answer meshkit made is JSON with an `error` object;
- no request takes more than a few seconds (no hang);
- afterwards the server is healthy, and its log has no traceback.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from meshkit.harness.daemons import Echo, Extproc, extproc
from meshkit.harness.envoy import Envoy

from .conftest import front, request

pytestmark = pytest.mark.integration

CASES = 1200
KEY = "mk_fuzz_0123456789abcdef"
CHAIN = ("auth", "body-hash", "model-router")
DECIDED = {200, 400, 401, 403, 404, 413}


@pytest.fixture(scope="module")
def meshkit_server(workdir: Path) -> Iterator[Extproc]:
    keys = workdir / "fuzz-keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            [{"sha256": hashlib.sha256(KEY.encode()).hexdigest(), "subject": "fuzz", "scopes": ["llm"]}]
        )
    )
    routes = workdir / "fuzz-routes.yaml"
    routes.write_text(
        yaml.safe_dump(
            {
                "scopes": [{"path": "/v1/", "scope": "llm"}, {"path": "/admin", "scope": "admin"}],
                "models": {"allow": ["gpt-4o-mini", "gpt-4o", "claude-3-5-sonnet"]},
            }
        )
    )
    args = [
        "--filters", ",".join(CHAIN), "--api-keys-file", str(keys), "--routes-file", str(routes),
        "--canonical-json", "--max-body-bytes", "64KiB",
    ]  # fmt: skip
    with extproc(workdir, args) as server:
        yield server


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz", "ext_authz_http"])
def ingress(
    request: pytest.FixtureRequest, workdir: Path, upstream: Echo, meshkit_server: Extproc
) -> Iterator[Envoy]:
    with front(
        workdir, upstream, meshkit_server, request.param, filters=CHAIN, max_body_bytes=64 << 10
    ) as proxy:
        yield proxy


_ODD = ["", " ", "\u0000", "\ud7ff", "é", "😀", "\u202e", "a" * 300, "../", "a.b.>", "*", "${x}", "%00", "\\"]


def _scalar(rng: random.Random) -> object:
    return rng.choice(
        [
            None,
            True,
            False,
            rng.randint(-(10**30), 10**30),
            rng.random() * 10 ** rng.randint(-5, 300),
            rng.choice(_ODD),
            "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 40))),
            rng.choice(["gpt-4o-mini", "gpt-4o", "claude-3-5-sonnet", "fast", "unknown-model", "a/b:c-d.e"]),
        ]
    )


def _value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.random()
    if depth > 4 or kind < 0.5:
        return _scalar(rng)
    if kind < 0.75:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        rng.choice(["model", "stream", "messages", "input", "x", "é"]): _value(rng, depth + 1)
        for _ in range(3)
    }


def _json_text(rng: random.Random) -> str:
    doc: dict[str, object] = {}
    if rng.random() < 0.8:
        doc["model"] = (
            _scalar(rng) if rng.random() < 0.4 else rng.choice(["gpt-4o-mini", "gpt-4o", "bad model!"])
        )
    if rng.random() < 0.5:
        doc["stream"] = _scalar(rng)
    for _ in range(rng.randint(0, 4)):
        doc[rng.choice(["messages", "input", "user", "metadata", "nested"])] = _value(rng)
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.5)
    roll = rng.random()
    if roll < 0.1:  # a duplicate key, as a hand-made suffix
        text = text[:-1] + (", " if len(doc) else "") + '"model": "gpt-4o"}'
    elif roll < 0.15:
        text = text[: rng.randint(0, len(text))]  # truncated
    elif roll < 0.2:
        text = text.replace("1", "NaN", 1)
    return text


def _body(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.7:
        return _json_text(rng).encode("utf-8", "surrogatepass")
    if roll < 0.8:
        return rng.randbytes(rng.randint(0, 2048))
    if roll < 0.85:
        return b"\xef\xbb\xbf" + _json_text(rng).encode("utf-8", "surrogatepass")  # BOM
    if roll < 0.9:
        return _json_text(rng).encode("utf-16")
    if roll < 0.95:
        return b"[" * rng.randint(1, 5000)  # deep nesting
    return b"x" * rng.choice([(64 << 10) + 1, 70_000])  # over --max-body-bytes


def _header_value(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + "-._~+/=:;,!@#$%^&*()[]{}<>?|'\" \t"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))).strip()


def _headers(rng: random.Random) -> dict[str, str]:
    headers = {
        "content-type": rng.choice(["application/json", "text/plain", "application/json; charset=utf-16"])
    }
    roll = rng.random()
    if roll < 0.4:
        headers["x-api-key"] = KEY
    elif roll < 0.55:
        headers["authorization"] = f"Bearer {KEY}"
    elif roll < 0.7:
        headers["authorization"] = rng.choice(
            ["Bearer ", "Bearer a.b.c", "bearer " + _header_value(rng), _header_value(rng)]
        )
    elif roll < 0.8:
        headers["x-api-key"] = _header_value(rng)
    for _ in range(rng.randint(0, 3)):
        name = rng.choice(
            [
                "x-auth-subject",
                "x-auth-scopes",
                "x-model",
                "x-stream",
                "x-body-hash",
                "x-request-id",
                "x-fuzz",
            ]
        )
        headers[name] = _header_value(rng)
    return headers


def test_fuzzed_requests_never_crash_hang_or_5xx(ingress: Envoy, meshkit_server: Extproc) -> None:
    rng = random.Random(20261202)
    statuses: dict[int, int] = {}
    for i in range(CASES):
        body = _body(rng)
        headers = _headers(rng)
        path = rng.choice(["/v1/chat/completions", "/v1/embeddings", "/v1/messages", "/admin/x", "/"])
        started = time.monotonic()
        resp = request(ingress.url(path=path), body=body, headers=headers, timeout=10)
        assert time.monotonic() - started < 5, f"case {i} took too long"
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
        assert resp.status in DECIDED, (i, resp.status, headers, body[:200], resp.body[:300])
        if resp.status != 200:
            assert "error" in resp.json(), (i, resp.body[:300])
    # The cases reach every decision, not only one kind of refusal.
    assert {200, 400, 401}.issubset(statuses), statuses
    with urllib.request.urlopen(meshkit_server.admin_url + "/healthz", timeout=5) as health:
        assert health.status == 200
    log = meshkit_server.process.log_path.read_text(errors="replace")
    assert "Traceback" not in log
