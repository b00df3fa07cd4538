"""What body-hash is for: Envoy ring-hashes on x-body-hash, so the same body always reaches the same pod."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from meshkit.harness.daemons import Extproc, echo
from meshkit.harness.envoy import envoy
from meshkit.render import Api, FrontConfig

from .conftest import request

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("api", ["ext_proc", "ext_authz", "ext_authz_http"])
def test_same_body_same_upstream(workdir: Path, meshkit_server: Extproc, api: Api) -> None:
    with echo(workdir, name=f"pod-a-{api}") as a, echo(workdir, name=f"pod-b-{api}") as b:
        config = FrontConfig(
            upstream_ports=(a.port, b.port), extproc_port=meshkit_server.port_for(api), api=api, listen_port=0
        )
        with envoy(config.render(), workdir) as proxy:
            landed: dict[bytes, set[str]] = defaultdict(set)
            for i in range(30):
                body = f'{{"input": "question {i}"}}'.encode()
                for _ in range(3):
                    resp = request(proxy.url(path="/v1/embeddings"), body=body)
                    assert resp.status == 200
                    landed[body].add(resp.json()["upstream"])
    assert all(len(pods) == 1 for pods in landed.values()), "a body reached two pods"
    assert {pod for pods in landed.values() for pod in pods} == {f"pod-a-{api}", f"pod-b-{api}"}
