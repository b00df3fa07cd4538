"""model-router through a real Envoy on every path: which upstream answered, and what it received.

Three echo upstreams: `gpt-4o` has its own, `gpt-4o-mini` its own, everything else goes to the default
one (the rendered `model_routes`). Two meshkit processes, because aliases and the ext_authz HTTP port
do not go together (meshkit refuses to start so, tested below):

- `aliased`: `--routes-file` with an alias (fast -> gpt-4o-mini) and an allow-list, gRPC only: serves
  ext_proc (the alias rewrites the body) and ext_authz gRPC (the alias is refused);
- `plain`: the same allow-list without aliases, with `--http-listen`: serves ext_authz HTTP.

Each serves bodies up to 32 MiB (`--max-body-bytes`), for the 20 MiB request whose `model` is its last key.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshkit.harness.daemons import Echo, Extproc, daemon, echo, extproc, meshkit_argv
from meshkit.harness.envoy import Envoy, envoy
from meshkit.render import Api, FrontConfig

from .conftest import Response, request

pytestmark = pytest.mark.integration
MAX = 32 << 20
ALLOW = ["gpt-4o", "gpt-4o-mini", "claude-3-5-haiku"]  # claude-3-5-haiku: allowed, no route of its own
CHAT = [{"role": "user", "content": "hello"}]


@dataclass(frozen=True)
class Upstreams:
    default: Echo
    gpt4o: Echo
    mini: Echo


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-router")


@pytest.fixture(scope="module")
def upstreams(workdir: Path) -> Iterator[Upstreams]:
    with (
        echo(workdir, name="echo-default") as default,
        echo(workdir, name="echo-gpt-4o") as gpt4o,
        echo(workdir, name="echo-gpt-4o-mini") as mini,
    ):
        yield Upstreams(default, gpt4o, mini)


def routes_file(workdir: Path, name: str, aliases: bool) -> Path:
    path = workdir / name
    models: dict[str, object] = {"allow": ALLOW}
    if aliases:
        models["aliases"] = {"fast": "gpt-4o-mini"}
    path.write_text(json.dumps({"models": models}))  # JSON is YAML
    return path


def _args(routes: Path) -> list[str]:
    return ["--filters", "model-router", "--routes-file", str(routes), "--max-body-bytes", str(MAX)]


@pytest.fixture(scope="module")
def aliased(workdir: Path) -> Iterator[Extproc]:
    args = _args(routes_file(workdir, "aliased.yaml", aliases=True))
    with daemon("extproc", workdir, args, name="meshkit-aliased") as running:
        yield Extproc(running.process, running.command, running.addresses)


@pytest.fixture(scope="module")
def plain(workdir: Path) -> Iterator[Extproc]:
    args = _args(routes_file(workdir, "plain.yaml", aliases=False))
    with extproc(workdir, args, name="meshkit-plain") as server:
        yield server


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz", "ext_authz_http"])
def ingress(
    request: pytest.FixtureRequest, workdir: Path, upstreams: Upstreams, aliased: Extproc, plain: Extproc
) -> Iterator[Envoy]:
    api = Api(request.param)
    server = plain if api is Api.EXT_AUTHZ_HTTP else aliased
    cfg = FrontConfig(
        upstream_ports=(upstreams.default.port,),
        model_routes=(("gpt-4o", (upstreams.gpt4o.port,)), ("gpt-4o-mini", (upstreams.mini.port,))),
        filters=("model-router",),
        api=api,
        extproc_port=server.port_for(api),
        listen_port=0,
        max_body_bytes=MAX,
    )
    with envoy(cfg.render(), workdir, name=f"envoy-{api.value}") as proxy:
        yield proxy


def api_of(request: pytest.FixtureRequest) -> str:
    return str(request.node.callspec.params["ingress"])


def post(proxy: Envoy, doc: object | bytes, headers: dict[str, str] | None = None) -> Response:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return request(
        proxy.url(path="/v1/chat/completions"),
        body=body,
        headers={"content-type": "application/json", **(headers or {})},
    )


def answered_by(resp: Response) -> str:
    assert resp.status == 200, resp.body[:500]
    return str(resp.json()["upstream"])


def error_of(resp: Response, status: int) -> dict[str, str]:
    assert resp.status == status, resp.body[:500]
    assert resp.headers["content-type"] == "application/json"
    error: dict[str, str] = resp.json()["error"]
    return error


# -- routing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "stream", "upstream"),
    [
        ("gpt-4o", True, "echo-gpt-4o"),
        ("gpt-4o-mini", False, "echo-gpt-4o-mini"),
        ("claude-3-5-haiku", None, "echo-default"),
    ],
)
def test_each_model_reaches_its_own_upstream(
    ingress: Envoy, model: str, stream: bool | None, upstream: str
) -> None:
    doc: dict[str, object] = {"model": model, "messages": CHAT}
    if stream is not None:
        doc["stream"] = stream
    resp = post(ingress, doc, {"x-model": "gpt-4o", "x-stream": "maybe"})  # spoofed: overwritten
    assert answered_by(resp) == upstream
    seen = resp.upstream_headers
    assert seen["x-model"] == model
    assert seen["x-stream"] == ("true" if stream else "false")
    assert resp.json()["body_sha256"] == hashlib.sha256(json.dumps(doc).encode()).hexdigest()  # untouched


@pytest.mark.parametrize(
    "body",
    [b"plain text, not JSON", b'{"input": "no model"}', b'[{"model": "gpt-4o"}]', b""],
    ids=["text", "no-model", "array", "empty"],
)
def test_other_bodies_pass_untouched_and_client_headers_never_arrive(ingress: Envoy, body: bytes) -> None:
    resp = post(ingress, body, {"x-model": "gpt-4o", "x-stream": "true"})
    assert answered_by(resp) == "echo-default"  # the client's x-model did not pick the route
    seen = resp.upstream_headers
    assert "x-model" not in seen
    assert "x-stream" not in seen
    assert resp.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_get_without_body_goes_to_the_default_upstream(ingress: Envoy) -> None:
    resp = request(ingress.url(path="/v1/models"), method="GET", headers={"x-model": "gpt-4o"})
    assert answered_by(resp) == "echo-default"
    assert "x-model" not in resp.upstream_headers


def test_unknown_model_is_404_model_not_found(ingress: Envoy) -> None:
    error = error_of(post(ingress, {"model": "gpt-5", "messages": CHAT}), 404)
    assert error["code"] == "model_not_found"
    assert error["type"] == "invalid_request_error"
    assert "gpt-5" in error["message"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"model": "gpt 4o!", "messages": []}', "invalid_model"),
        (b'{"model": 42}', "invalid_model"),
        (b'{"model": "gpt-4o", "stream": "yes"}', "invalid_stream"),
        (b'{"model": "gpt-4o", "model": "gpt-4o-mini"}', "duplicate_key"),
        (b'{"model": "gpt-4o", "temperature": NaN}', "invalid_json"),  # with an allow-list
    ],
)
def test_bad_requests_are_400_json(ingress: Envoy, body: bytes, code: str) -> None:
    assert error_of(post(ingress, body), 400)["code"] == code


# -- aliases -----------------------------------------------------------------------------------------
def test_alias_rewrites_the_body_over_ext_proc_and_is_refused_over_ext_authz(
    ingress: Envoy, request: pytest.FixtureRequest
) -> None:
    api = api_of(request)
    if api == "ext_authz_http":
        pytest.skip("no aliases with --http-listen: test_aliases_and_http_listen_do_not_start")
    doc = {"model": "fast", "messages": [{"role": "user", "content": "héllo"}], "stream": True}
    resp = post(ingress, doc)
    if api == "ext_authz":
        error = error_of(resp, 500)
        assert error["code"] == "body_rewrite_needs_ext_proc"
        assert "ext_proc" in error["message"]
        return
    assert answered_by(resp) == "echo-gpt-4o-mini"
    seen = resp.json()
    expected = json.dumps({**doc, "model": "gpt-4o-mini"}, ensure_ascii=False, separators=(",", ":")).encode()
    assert seen["body_sha256"] == hashlib.sha256(expected).hexdigest()
    assert seen["body_bytes"] == len(expected)
    assert seen["headers"]["content-length"] == str(len(expected))  # shorter than the client's body
    assert seen["headers"]["x-model"] == "gpt-4o-mini"


def test_aliases_and_http_listen_do_not_start(workdir: Path) -> None:
    args = _args(routes_file(workdir, "refused.yaml", aliases=True))
    listen = ["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    result = subprocess.run(
        meshkit_argv("extproc", *listen, *args), capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2, result.stderr
    assert "ext_authz HTTP service" in result.stderr
    assert "drop --http-listen" in result.stderr


# -- the 20 MiB body ---------------------------------------------------------------------------------
def big_chat(model: str) -> dict[str, object]:
    """About 20 MiB of messages; nested `model` keys and strings mentioning "model" on the way, and the
    top-level `model` as the very last key."""
    msg = {"role": "user", "content": 'the "model": "gpt-4o-mini" ' * 40, "model": "nested"}
    count = (20 << 20) // len(json.dumps(msg))
    return {"messages": [msg] * count, "stream": True, "model": model}


def test_20_mib_body_with_model_last_is_routed(ingress: Envoy, request: pytest.FixtureRequest) -> None:
    doc = big_chat("gpt-4o")
    body = json.dumps(doc).encode()
    assert len(body) >= 20 << 20
    started = time.perf_counter()
    resp = post(ingress, body)
    elapsed = time.perf_counter() - started
    assert answered_by(resp) == "echo-gpt-4o", api_of(request)
    seen = resp.json()
    assert seen["body_bytes"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert seen["headers"]["x-stream"] == "true"
    assert elapsed < 10, elapsed


def test_20_mib_aliased_body_is_rewritten_over_ext_proc(
    ingress: Envoy, request: pytest.FixtureRequest
) -> None:
    if api_of(request) != "ext_proc":
        pytest.skip("a body rewrite is ext_proc only")
    doc = big_chat("fast")
    resp = post(ingress, doc)
    assert answered_by(resp) == "echo-gpt-4o-mini"
    expected = json.dumps({**doc, "model": "gpt-4o-mini"}, separators=(",", ":")).encode()
    assert resp.json()["body_sha256"] == hashlib.sha256(expected).hexdigest()
