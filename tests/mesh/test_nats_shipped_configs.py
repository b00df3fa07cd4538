"""The shipped NATS configs (`mesh/nats/origin.conf`, `mesh/nats/leaf.conf`, `leaf-mirror.conf`): checked
by `nats-server -t` as shipped, then actually run as an origin + leaf pair.

The shipped files use fixed, documented loopback ports (4222/8222/7422 and 4223/8223), which would
collide between tests and with anything else on the machine. The running test therefore copies them
and rewrites only the listen addresses to `127.0.0.1:-1` (any free port, read back from the log), the
leaf's remote to the origin's real leafnode port and the store dir to the test's folder: every other
line (domain, ping settings, limits) runs as shipped. Each rewrite must match exactly once, so a change
of the shipped files' shape fails here instead of silently testing something else.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from importlib import resources
from pathlib import Path

import nats
import pytest
from nats.errors import NoRespondersError
from nats.js.errors import ServiceUnavailableError

from meshkit.edge.edge_mirror import MirrorSource, ensure_mirror
from meshkit.edge.token_contract import message_id
from meshkit.edge.token_stream import ensure_stream
from meshkit.errors import HarnessError
from meshkit.harness.nats import nats_server_binary
from meshkit.harness.process import ManagedProcess, log_match, log_matches
from meshkit.nats_flush import flushed

CONFIGS = ("origin.conf", "leaf.conf", "leaf-mirror.conf")


def shipped(name: str) -> str:
    return resources.files("meshkit").joinpath(f"nats/{name}").read_text()


def binary() -> str:
    try:
        return nats_server_binary()
    except HarnessError as exc:
        pytest.skip(str(exc))


def rewrite(text: str, replacements: dict[str, str]) -> str:
    for pattern, new in replacements.items():
        text, count = re.subn(pattern, new, text, flags=re.MULTILINE)
        assert count == 1, f"{pattern!r} matched {count} times in the shipped config"
    return text


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_passes_nats_server_t(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_text(shipped(name))
    result = subprocess.run(
        [binary(), "-t", "-c", str(path)], capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "is valid" in result.stdout + result.stderr


def test_shipped_configs_say_what_the_field_notes_require() -> None:
    origin, leaf = shipped("origin.conf"), shipped("leaf.conf")
    assert re.search(r'^\s*domain: "origin"', origin, re.MULTILINE)
    for text in (origin, leaf):
        assert re.search(r'^ping_interval: "1s"$', text, re.MULTILINE)
        assert re.search(r"^ping_max: 3$", text, re.MULTILINE)
        assert not re.search(r"^\s*reconnect:", text, re.MULTILINE)  # breaks 2.9.10 (field notes)
        assert "127.0.0.1" in text and "0.0.0.0" not in text  # loopback defaults
    assert "jetstream" not in re.sub(r"#.*", "", leaf)  # the leaf uses the origin's JetStream
    assert 'url: "nats-leaf://127.0.0.1:7422"' in leaf and 'listen: "127.0.0.1:7422"' in origin
    mirror = shipped("leaf-mirror.conf")
    assert re.search(r'^\s*domain: "edge"', mirror, re.MULTILINE)  # not the origin's: two domains
    assert re.search(r'^ping_interval: "1s"$', mirror, re.MULTILINE) and re.search(
        r"^ping_max: 3$", mirror, re.M
    )
    assert 'url: "nats-leaf://127.0.0.1:7422"' in mirror and "0.0.0.0" not in mirror
    for key in ("listen", "http"):  # beside a plain leaf on one machine: other ports
        (a,) = re.findall(rf'^{key}: "([^"]+)"', leaf, re.MULTILINE)
        (b,) = re.findall(rf'^{key}: "([^"]+)"', mirror, re.MULTILINE)
        assert a != b


def _start(name: str, config: str, workdir: Path, *, linked: bool) -> ManagedProcess:
    path = workdir / f"{name}.conf"
    path.write_text(config)
    ready = log_matches(r"Server is ready")
    if linked:
        leaf_ready = log_matches(r"Leafnode connection created")
        proc = ManagedProcess(
            name,
            [binary(), "-c", str(path)],
            log_dir=workdir,
            cwd=workdir,
            ready=lambda p: ready(p) and leaf_ready(p),
            start_timeout=15,
        )
    else:
        proc = ManagedProcess(
            name, [binary(), "-c", str(path)], log_dir=workdir, cwd=workdir, ready=ready, start_timeout=15
        )
    return proc  # started by `with`


def _origin_conf(tmp_path: Path) -> str:
    """origin.conf as shipped, on free ports, its store in `tmp_path`."""
    return rewrite(
        shipped("origin.conf"),
        {
            r'^listen: "127\.0\.0\.1:4222"': 'listen: "127.0.0.1:-1"',
            r'^http: "127\.0\.0\.1:8222"': 'http: "127.0.0.1:-1"',
            r'^(\s*)listen: "127\.0\.0\.1:7422"': r'\1listen: "127.0.0.1:-1"',
            r'^(\s*)store_dir: "\./meshkit-nats-origin"': rf'\1store_dir: "{tmp_path / "js"}"',
        },
    )


def _port(proc: ManagedProcess, what: str) -> int:
    return int(log_match(proc, rf"Listening for {what} connections on [^\s]+:(\d+)").group(1))


async def test_shipped_origin_and_leaf_run_and_the_leaf_reaches_jetstream_through_the_domain(
    tmp_path: Path,
) -> None:
    origin_conf = _origin_conf(tmp_path)
    with _start("shipped-origin", origin_conf, tmp_path, linked=False) as origin:
        origin_client, origin_leaf = _port(origin, "client"), _port(origin, "leafnode")
        leaf_conf = rewrite(
            shipped("leaf.conf"),
            {
                r'^listen: "127\.0\.0\.1:4223"': 'listen: "127.0.0.1:-1"',
                r'^http: "127\.0\.0\.1:8223"': 'http: "127.0.0.1:-1"',
                r'url: "nats-leaf://127\.0\.0\.1:7422"': f'url: "nats-leaf://127.0.0.1:{origin_leaf}"',
            },
        )
        with _start("shipped-leaf", leaf_conf, tmp_path, linked=True) as leaf:
            nc = await nats.connect(f"nats://127.0.0.1:{_port(leaf, 'client')}")
            direct = await nats.connect(f"nats://127.0.0.1:{origin_client}")
            try:
                with pytest.raises(ServiceUnavailableError):  # no JetStream on the leaf itself
                    await nc.jetstream(timeout=2).stream_info("CHAT")
                js = nc.jetstream(domain="origin", timeout=5)
                await ensure_stream(js)  # the JetStream API crosses the link
                origin_js = direct.jetstream()
                ack = await origin_js.publish(
                    "chat.c1.tokens",
                    b'{"conversation_id":"c1","sequence":1}',
                    headers={"Nats-Msg-Id": message_id("c1", 1)},
                )
                assert ack.stream == "CHAT" and ack.domain == "origin"
                # read at the edge through the domain, as meshkit sse does
                got = await js.get_last_msg("CHAT", "chat.c1.tokens")
                assert got.data == b'{"conversation_id":"c1","sequence":1}'
                # a client of the leaf cannot put tokens in: a forged one (or a Msg-Id taken ahead
                # of the real token) never reaches the origin
                await nc.publish(
                    "chat.c1.tokens",
                    b'{"conversation_id":"c1","sequence":2}',
                    headers={"Nats-Msg-Id": message_id("c1", 2)},
                )
                with pytest.raises(NoRespondersError):
                    await nc.request("chat.c2.tokens", b"{}", timeout=2)
                # nor a forged live copy to the adapters of other edges (they follow chat.<id>.live)
                watcher = await direct.subscribe("chat.c1.live")
                await flushed(direct)
                await nc.publish("chat.c1.live", b'{"conversation_id":"c1","sequence":9}')
                await flushed(nc)
                with pytest.raises(nats.errors.TimeoutError):
                    await watcher.next_msg(timeout=0.5)
                # dead letters (raw payloads) stay at the origin
                leaked = await nc.subscribe("chat.deadletter")
                await flushed(nc)
                await direct.publish("chat.deadletter", b'{"reason": "not_json"}')
                await flushed(direct)
                with pytest.raises(nats.errors.TimeoutError):
                    await leaked.next_msg(timeout=0.5)
                await flushed(nc)
                info = await origin_js.stream_info("CHAT")
                assert info.state.messages == 1  # only the token published at the origin
            finally:
                await nc.close()
                await direct.close()


async def test_shipped_leaf_mirror_runs_and_mirrors_the_origins_stream(tmp_path: Path) -> None:
    """origin.conf + leaf-mirror.conf as shipped (ports and store dirs rewritten): the edge's JetStream
    (domain edge) holds a mirror of CHAT@origin that `ensure_mirror` creates and the origin fills."""
    origin_conf = _origin_conf(tmp_path)
    with _start("shipped-origin", origin_conf, tmp_path, linked=False) as origin:
        origin_leaf = _port(origin, "leafnode")
        mirror_conf = rewrite(
            shipped("leaf-mirror.conf"),
            {
                r'^listen: "127\.0\.0\.1:4224"': 'listen: "127.0.0.1:-1"',
                r'^http: "127\.0\.0\.1:8224"': 'http: "127.0.0.1:-1"',
                r'url: "nats-leaf://127\.0\.0\.1:7422"': f'url: "nats-leaf://127.0.0.1:{origin_leaf}"',
                r'^(\s*)store_dir: "\./meshkit-nats-edge"': rf'\1store_dir: "{tmp_path / "edge-js"}"',
            },
        )
        with _start("shipped-leaf-mirror", mirror_conf, tmp_path, linked=True) as leaf:
            nc = await nats.connect(f"nats://127.0.0.1:{_port(leaf, 'client')}")
            direct = await nats.connect(f"nats://127.0.0.1:{_port(origin, 'client')}")
            try:
                origin_js = direct.jetstream(timeout=5)  # tokens enter at the origin (the leaf denies them)
                edge_js = nc.jetstream(domain="edge", timeout=5)
                await ensure_stream(origin_js)
                await origin_js.publish("chat.c1.tokens", b'{"conversation_id":"c1","sequence":1}')
                config = await ensure_mirror(edge_js, "CHAT_EDGE", MirrorSource("CHAT", "origin"))
                assert config.mirror is not None and config.mirror.name == "CHAT"
                for _ in range(100):
                    if (await edge_js.stream_info("CHAT_EDGE")).state.messages == 1:
                        break
                    await asyncio.sleep(0.05)
                msg = await edge_js.get_last_msg("CHAT_EDGE", "chat.c1.tokens")
                assert msg.data == b'{"conversation_id":"c1","sequence":1}'
                assert (await edge_js.stream_info("CHAT_EDGE")).state.messages == 1
            finally:
                await nc.close()
                await direct.close()
