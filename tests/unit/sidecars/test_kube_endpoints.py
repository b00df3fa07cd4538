"""The Kubernetes client's parts that need no server: in-cluster config from the environment, the token
re-read when its file changes, and watch events read line by line (410 -> Gone, ERROR, unknown types);
and the list/watch loop against the fake API where its pacing matters (410 after every list)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshkit.errors import ConfigError
from meshkit.harness.fake_kube import FakeKube, endpoint
from meshkit.sidecars.kube_endpoints import (
    MAX_EVENT_BYTES,
    EndpointSliceWatch,
    Gone,
    KubeConfig,
    KubeError,
    TokenFile,
    _lines,
)

CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("tok-1\n")
    return path


def test_in_cluster_config_from_the_environment(monkeypatch: pytest.MonkeyPatch, token: Path) -> None:
    if not Path(CA_BUNDLE).exists():
        pytest.skip("no CA bundle to stand in for the service account's ca.crt")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    config = KubeConfig.resolve("", str(token), CA_BUNDLE)
    assert str(config.api) == "https://10.96.0.1" and config.ssl is not None  # 443: the default port
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    assert str(KubeConfig.resolve("", str(token), CA_BUNDLE).api) == "https://[fd00::1]:6443"
    plain = KubeConfig.resolve("http://127.0.0.1:8001", str(token), "/nonexistent")  # no CA for http
    assert plain.ssl is None and plain.token.read() == "tok-1"


def test_what_is_missing_is_named(monkeypatch: pytest.MonkeyPatch, token: Path, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST"):
        KubeConfig.resolve("", str(token), "")
    with pytest.raises(ConfigError, match="http:// or https://"):
        KubeConfig.resolve("ftp://x", str(token), "")
    with pytest.raises(ConfigError, match="--kube-token-file"):
        KubeConfig.resolve("http://127.0.0.1:1", str(tmp_path / "absent"), "")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        KubeConfig.resolve("http://127.0.0.1:1", str(tmp_path / "empty"), "")
    with pytest.raises(ConfigError, match="--kube-ca-file"):
        KubeConfig.resolve("https://127.0.0.1:1", str(token), str(tmp_path / "absent.crt"))


def test_the_token_is_read_again_when_its_file_changes(token: Path, tmp_path: Path) -> None:
    source = TokenFile(token)
    assert source.read() == "tok-1"
    # kubelet swaps the projected token by renaming a new file into place
    fresh = tmp_path / "token.new"
    fresh.write_text("tok-2")
    os.replace(fresh, token)
    assert source.read() == "tok-2"


class Stream:
    """What `_lines` reads: `iter_any()` giving the chunks as the network cut them."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def iter_any(self):  # type: ignore[no-untyped-def]
        for chunk in self.chunks:
            yield chunk


async def test_events_are_lines_whatever_the_chunks() -> None:
    events = [b'{"type":"ADDED"}', b'{"type":"BOOKMARK"}', b'{"type":"DELETED"}']
    whole = b"\n".join(events) + b"\n\n"
    chunks = [whole[i : i + 7] for i in range(0, len(whole), 7)]
    assert [line async for line in _lines(Stream(chunks))] == events  # type: ignore[arg-type]
    with pytest.raises(KubeError, match="over"):
        async for _ in _lines(Stream([b"x" * (MAX_EVENT_BYTES + 1)])):  # type: ignore[arg-type]
            pass


def watch(changed: list[tuple[str, ...]]) -> EndpointSliceWatch:
    config = KubeConfig.resolve("http://127.0.0.1:1", __file__, "")  # any non-empty file as the token

    def no_session() -> aiohttp.ClientSession:
        raise AssertionError("no requests here")

    return EndpointSliceWatch(config, no_session, "cache", "varnish", "http", changed=changed.append)


def event(kind: str, obj: Any) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode()


def test_watch_events_change_the_set_and_errors_end_the_watch() -> None:
    changed: list[tuple[str, ...]] = []
    w = watch(changed)
    slice_a = {
        "metadata": {"name": "varnish-a", "resourceVersion": "7"},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}],
        "ports": [{"name": "http", "port": 6081}],
    }
    assert w._event(event("ADDED", slice_a)) == "7"
    assert w._event(event("BOOKMARK", {"metadata": {"resourceVersion": "9"}})) == "9"
    assert (
        w._event(event("DELETED", {**slice_a, "metadata": {"name": "varnish-a", "resourceVersion": "10"}}))
        == "10"
    )
    assert changed == [("10.0.0.1:6081",), ()]
    with pytest.raises(Gone):
        w._event(event("ERROR", {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}))
    with pytest.raises(KubeError, match="ERROR 500"):
        w._event(event("ERROR", {"kind": "Status", "code": 500, "message": "etcd"}))
    for bad in (b"not json", event("SURPRISE", {}), b'{"type": "ADDED", "object": 3}'):
        with pytest.raises(KubeError) as caught:
            w._event(bad)
        assert caught.value.kind == "bad_answer"


async def test_a_410_right_after_every_list_is_listed_again_with_a_backoff_not_in_a_loop(
    tmp_path: Path,
) -> None:
    """A server whose lists are older than what its watches accept (every watch from the list's own
    resourceVersion is 410): the set still comes from the lists, and they are not made in a loop."""
    token = tmp_path / "token"
    token.write_text("t\n")
    with FakeKube(token="t") as kube:
        kube.put_slice("cache", "varnish-a", "varnish", [endpoint("10.0.0.1")], ports=[("http", 6081)])
        kube.expire_watches = True
        changed: list[tuple[str, ...]] = []
        restarts: list[str] = []
        config = KubeConfig.resolve(kube.url, str(token), "")
        async with aiohttp.ClientSession() as session:
            w = EndpointSliceWatch(
                config,
                lambda: session,
                "cache",
                "varnish",
                "http",
                changed=changed.append,
                restart=restarts.append,
            )
            task = asyncio.create_task(w.run())
            await asyncio.sleep(1.5)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        lists = [q for _, _, q in kube.requests if "watch" not in q]
    assert changed == [("10.0.0.1:6081",)]
    assert 2 <= len(lists) <= 6, len(lists)  # 0.2 + 0.4 + 0.8 s of backoff: about 4, not hundreds
    assert set(restarts) == {"gone"}
