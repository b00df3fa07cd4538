"""`meshkit render`: the printed config is what a user deploys, and Envoy accepts it as printed."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from meshkit.errors import ConfigError
from meshkit.extproc.filter import Exchange, Filter
from meshkit.extproc.filters import FILTERS
from meshkit.render import command

from .conftest import cluster, meshkit_filter, routes_after_refusals, validate


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="meshkit render")
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert command.run(parse(*argv)) == 0
    return capsys.readouterr().out


def address(doc: dict[str, Any], where: dict[str, Any]) -> tuple[str, int]:
    sa = where["address"]["socket_address"]
    return sa["address"], sa["port_value"]


def test_the_bare_command_prints_a_config_envoy_accepts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = run(capsys)
    validate(text, tmp_path)
    doc = yaml.safe_load(text)
    assert address(doc, doc["admin"]) == ("127.0.0.1", 9901)
    assert address(doc, doc["static_resources"]["listeners"][0]) == ("127.0.0.1", 10000)
    block = meshkit_filter(doc)
    assert block["http_service"]["server_uri"]["uri"] == "http://127.0.0.1:50052"  # ext_authz_http
    (upstream,) = cluster(doc, "upstream")["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert address(doc, upstream["endpoint"]) == ("127.0.0.1", 8080)
    assert text.startswith("# ")
    assert "meshkit extproc --filters body-hash" in text and "--http-listen 127.0.0.1:50052" in text


@pytest.mark.parametrize("api", ["ext_authz_http", "ext_authz", "ext_proc"])
@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--failure-mode-allow", "false", "--max-body-bytes", "1KiB"],
        ["--max-body-bytes", "64MiB", "--filter-timeout", "2"],
    ],
    ids=["defaults", "fail-closed-small", "big-slow"],
)
def test_every_api_validates(
    api: str, flags: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = run(capsys, "--api", api, "--filters", "body-hash", *flags)
    validate(text, tmp_path)
    block = meshkit_filter(yaml.safe_load(text))
    assert block["failure_mode_allow"] is ("false" not in flags)
    if "--filter-timeout" in flags:
        timeout = {
            "ext_proc": lambda: block["message_timeout"],
            "ext_authz": lambda: block["grpc_service"]["timeout"],
            "ext_authz_http": lambda: block["http_service"]["server_uri"]["timeout"],
        }[api]()
        assert float(timeout.removesuffix("s")) > 2.0


def test_addresses_from_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = run(
        capsys,
        "--api",
        "ext_proc",
        "--listen",
        "0.0.0.0:8000",
        "--admin",
        "127.0.0.1:0",
        "--meshkit",
        "meshkit.mesh.svc:9000",
        "--upstream",
        "llm.default.svc:80",
    )
    validate(text, tmp_path)
    doc = yaml.safe_load(text)
    assert address(doc, doc["static_resources"]["listeners"][0]) == ("0.0.0.0", 8000)
    meshkit = cluster(doc, "meshkit_extproc")
    assert meshkit["type"] == "STRICT_DNS"
    (endpoint,) = meshkit["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert address(doc, endpoint["endpoint"]) == ("meshkit.mesh.svc", 9000)
    assert cluster(doc, "upstream")["type"] == "STRICT_DNS"
    # meshkit cannot bind its Service's name: the command line it is told to run listens on its pod
    assert "--listen 0.0.0.0:9000" in text and "--listen meshkit.mesh.svc" not in text
    assert "Envoy reaches it as meshkit.mesh.svc:9000" in text


def test_ipv6_addresses(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = run(capsys, "--meshkit", "[::1]:50052", "--listen", "[::]:10000")
    validate(text, tmp_path)
    assert meshkit_filter(yaml.safe_load(text))["http_service"]["server_uri"]["uri"] == "http://[::1]:50052"
    assert "--http-listen [::1]:50052" in text  # HOST:PORT as meshkit's flags take it (was ::1:50052)
    assert "--listen [::1]:50051" in run(capsys, "--api", "ext_proc", "--meshkit", "[::1]:50051")
    assert "--listen 127.0.0.1:50051" in run(capsys, "--api", "ext_proc")  # an address stays as it is
    # localhost: the address Envoy connects to (IPv4 first), not whichever the system lists first
    local = run(capsys, "--api", "ext_proc", "--meshkit", "localhost:7")
    assert "--listen 127.0.0.1:7" in local and "every interface" not in local


def test_route_timeout_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert "timeout: 0s" in run(capsys)  # none by default
    text = run(capsys, "--route-timeout", "900")
    validate(text, tmp_path)
    (entry,) = routes_after_refusals(yaml.safe_load(text))
    assert entry["route"]["timeout"] == "900s"
    with pytest.raises(ConfigError, match="--route-timeout"):
        command.run(parse("--route-timeout", "later"))


def test_bad_flags_are_reported_together() -> None:
    args = parse(
        "--listen", "nowhere", "--max-body-bytes", "lots", "--filter-timeout", "soon", "--filters", "nope"
    )
    with pytest.raises(ConfigError) as excinfo:
        command.run(args)
    text = str(excinfo.value)
    for flag in ("--listen", "--max-body-bytes", "--filter-timeout"):
        assert flag in text
    with pytest.raises(ConfigError, match="unknown filter 'nope'"):
        command.run(parse("--filters", "nope"))


def test_a_response_phase_filter_needs_ext_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    class Usage(Filter):
        name: ClassVar[str] = "usage"
        fail_open: ClassVar[bool] = True

        def on_response_body(self, exchange: Exchange) -> None:
            return None

    monkeypatch.setitem(FILTERS, "usage", Usage)
    with pytest.raises(ConfigError, match=r"'usage' has response-phase hooks.*use ext_proc"):
        command.run(parse("--api", "ext_authz", "--filters", "body-hash,usage"))
    assert command.config_from(parse("--api", "ext_proc", "--filters", "body-hash,usage")).api == "ext_proc"


def test_config_file_is_not_silently_ignored() -> None:
    args = parse()
    args.config = Path("meshkit.yaml")  # the CLI adds --config to every command
    with pytest.raises(ConfigError, match="--config"):
        command.run(args)


def test_meshkit_render_from_the_command_line(tmp_path: Path) -> None:
    """Through `python -m meshkit render` (needs the `render` line in meshkit.cli.COMMANDS)."""
    result = subprocess.run(
        [sys.executable, "-m", "meshkit", "render", "--api", "ext_authz"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    validate(result.stdout, tmp_path)
    bad = subprocess.run(
        [sys.executable, "-m", "meshkit", "render", "--max-body-bytes", "lots"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "--max-body-bytes" in bad.stderr and "Traceback" not in bad.stderr


def test_path_and_model_routes_from_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The cache tier's ingress from the command line: /v1/embeddings to two ring-hashed Varnish ports,
    one model to its own pods, the rest to --upstream."""
    text = run(
        capsys,
        "--filters", "auth,body-hash,model-router",
        "--upstream", "127.0.0.1:8080",
        "--path-route", "/v1/embeddings=6081,6082",
        "--model-route", "gpt-4o=8091",
        "--model-route", "claude-3-5-sonnet=8092,8093",
    )  # fmt: skip
    validate(text, tmp_path)
    doc = yaml.safe_load(text)
    got = routes_after_refusals(doc)
    assert [r["route"]["cluster"] for r in got] == ["path_0", "model_0", "model_1", "upstream"]
    assert got[0]["match"] == {"path_separated_prefix": "/v1/embeddings"}
    assert got[0]["route"]["hash_policy"] == [{"header": {"header_name": "x-body-hash"}}]

    def ports(name: str) -> list[int]:
        endpoints = cluster(doc, name)["load_assignment"]["endpoints"][0]["lb_endpoints"]
        return [address(doc, e["endpoint"])[1] for e in endpoints]

    assert ports("path_0") == [6081, 6082] and cluster(doc, "path_0")["lb_policy"] == "RING_HASH"
    assert ports("model_0") == [8091] and ports("model_1") == [8092, 8093]
    assert ports("upstream") == [8080]


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--path-route", "/v1/embeddings"], "is not NAME=PORT"),
        (["--path-route", "/v1/embeddings=varnish"], "not a comma-separated list of ports"),
        (["--path-route", "/v1/x=1", "--path-route", "/v1/x=2"], "given twice"),
        (["--path-route", "v1/embeddings=6081"], "is not a path"),
        (["--model-route", "gpt 4o=8091"], "is not a model name"),
        (["--model-route", "gpt-4o=0"], "cannot be 0"),
    ],
)
def test_bad_routes_are_config_errors(flags: list[str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        command.run(parse("--filters", "body-hash,model-router", *flags))
