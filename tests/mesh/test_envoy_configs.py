"""Every rendered Envoy config is checked by Envoy itself (`envoy --mode validate`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from meshkit.extproc.chain import Chain
from meshkit.extproc.ext_authz_http import KEEPALIVE_SECONDS
from meshkit.extproc.filters import phases_of
from meshkit.extproc.filters.body_hash import BodyHashFilter, BodyHashOptions
from meshkit.harness.envoy import envoy_binary
from meshkit.render import Api, FrontConfig, processing_mode, upstream_direct


def validate(config: str, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(config)
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("api", ["ext_proc", "ext_authz", "ext_authz_http", "plain"])
@pytest.mark.parametrize(("max_body", "fail_open"), [(8 << 20, True), (1024, False), (64 << 20, True)])
def test_front_configs_validate(api: Api, max_body: int, fail_open: bool, tmp_path: Path) -> None:
    config = FrontConfig(
        upstream_ports=(8080, 8081),
        extproc_port=50051,
        api=api,
        max_body_bytes=max_body,
        failure_mode_allow=fail_open,
        message_timeout=0.5,
    ).render()
    validate(config, tmp_path)
    doc = yaml.safe_load(config)
    listener = doc["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] == max_body + (1 << 20)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    if api == "plain":
        assert names == ["envoy.filters.http.router"]
        return
    # The spoofed header is stripped before meshkit's filter runs, so it holds while meshkit is down.
    assert names[0] == "envoy.filters.http.header_mutation"
    assert names[-1] == "envoy.filters.http.router"
    meshkit_filter = hcm["http_filters"][1]["typed_config"]
    assert meshkit_filter["failure_mode_allow"] is fail_open
    if api == "ext_authz":
        assert meshkit_filter["with_request_body"]["max_request_bytes"] == max_body
        assert meshkit_filter["with_request_body"]["pack_as_bytes"] is True
    elif api == "ext_authz_http":
        assert meshkit_filter["with_request_body"]["max_request_bytes"] == max_body
        response = meshkit_filter["http_service"]["authorization_response"]
        assert response["allowed_upstream_headers"]["patterns"] == [{"exact": "x-body-hash"}]
        (cluster,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == "meshkit_extproc"]
        options = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]
        idle = float(options["common_http_protocol_options"]["idle_timeout"].removesuffix("s"))
        assert idle < KEEPALIVE_SECONDS  # Envoy closes idle connections first
    else:
        assert meshkit_filter["message_timeout"] == "0.5s"


def test_processing_mode_follows_the_chain() -> None:
    chain = Chain([BodyHashFilter(BodyHashOptions())])
    assert phases_of(["body-hash"]) == {p.value for p in chain.phases}
    mode = processing_mode(phases_of(["body-hash"]))
    assert mode["request_header_mode"] == "SEND"  # without SEND the body-phase header is dropped
    assert mode["request_body_mode"] == "BUFFERED"
    assert mode["response_header_mode"] == "SKIP"
    assert mode["response_body_mode"] == "NONE"
    assert processing_mode({"request_headers", "response_body"})["response_body_mode"] == "BUFFERED"


def test_upstream_direct_validates(tmp_path: Path) -> None:
    validate(upstream_direct(), tmp_path)


def test_missing_value_is_an_error() -> None:
    with pytest.raises(ValueError, match="extproc_port"):
        FrontConfig(upstream_ports=(1,), api="ext_proc").render()
