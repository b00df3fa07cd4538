"""The nats-server config and the VCL the harness writes, checked by the servers' own checkers
(`nats-server -t -c FILE`, `varnishd -C -f FILE`) without starting a server."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshkit.errors import HarnessError
from meshkit.harness.nats import nats_server_binary
from meshkit.harness.varnish import varnishd_binary
from meshkit.render import meshkit_vcl, nats_server_config, vcl_with_backends
from meshkit.render.varnish_vcl import shipped_vcl


def _require(find_binary: Callable[[], str]) -> str:
    """The server's binary, or a skip naming the package to install."""
    try:
        return find_binary()
    except HarnessError as exc:
        pytest.skip(str(exc))


# -- NATS ----------------------------------------------------------------------------------------------
def nats_check(config: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "nats.conf"
    path.write_text(config)
    return subprocess.run(
        [_require(nats_server_binary), "-t", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("jetstream", "domain", "leaf_remote"),
    [
        (True, "origin", None),  # an origin: JetStream with a domain
        (True, None, None),
        (False, None, "nats-leaf://127.0.0.1:7422"),  # a leaf without JetStream
        (True, "edge", "nats-leaf://127.0.0.1:7422"),  # a leaf with its own JetStream domain
    ],
)
def test_nats_configs_pass_nats_server_t(
    jetstream: bool, domain: str | None, leaf_remote: str | None, tmp_path: Path
) -> None:
    config = nats_server_config(
        name="test-server",
        store_dir=tmp_path / "js" if jetstream else None,
        domain=domain,
        leaf_remote=leaf_remote,
    )
    result = nats_check(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr
    assert ("jetstream {" in config) is jetstream
    assert "ping_interval" in config and "ping_max: 3" in config


def test_nats_checker_catches_a_broken_config(tmp_path: Path) -> None:
    # The checker is real: the field notes' `reconnect: 1s` breaks parsing on 2.9.10.
    broken = nats_server_config(name="x", store_dir=None, domain=None, leaf_remote=None).replace(
        "leafnodes {", "leafnodes {\n  reconnect: 1s"
    )
    assert nats_check(broken, tmp_path).returncode != 0


def test_nats_values_are_quoted_and_checked(tmp_path: Path) -> None:
    config = nats_server_config(name='odd "name"', store_dir=tmp_path / "a dir", domain="d", leaf_remote=None)
    assert nats_check(config, tmp_path).returncode == 0
    with pytest.raises(ValueError, match="ping_interval"):
        nats_server_config(name="x", store_dir=None, domain=None, leaf_remote=None, ping_interval="1 s")


# -- Varnish -------------------------------------------------------------------------------------------
@pytest.fixture
def readable_dir() -> Iterator[Path]:
    """varnishd reads `-f` after dropping privileges: a pytest tmp_path (under a 0700 dir) would not do."""
    path = Path(tempfile.mkdtemp(prefix="meshkit-vcl-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def varnish_compile(vcl: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    path = workdir / "test.vcl"
    path.write_text(vcl)
    path.chmod(0o644)
    return subprocess.run(
        [_require(varnishd_binary), "-C", "-f", str(path), "-n", str(workdir / "instance")],
        capture_output=True,
        text=True,
        timeout=60,
    )


VCL = """vcl 4.1;

sub vcl_recv {
    if (req.url ~ "^/b/") {
        set req.backend_hint = other;
    } else {
        set req.backend_hint = origin;
    }
}
"""


def test_vcl_with_backends_compiles(readable_dir: Path) -> None:
    vcl = vcl_with_backends(VCL, {"origin": ("127.0.0.1", 8080), "other": ("127.0.0.1", 8081)})
    result = varnish_compile(vcl, readable_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert vcl.splitlines()[0] == "vcl 4.1;"
    assert 'backend origin { .host = "127.0.0.1"; .port = "8080"; }' in vcl


def test_vcl_without_the_backends_it_names_does_not_compile(readable_dir: Path) -> None:
    result = varnish_compile(vcl_with_backends(VCL), readable_dir)
    assert result.returncode != 0
    assert "VCL compilation failed" in result.stderr


def test_vcl_backend_values_are_checked() -> None:
    with pytest.raises(ValueError, match="version"):
        vcl_with_backends("sub vcl_recv {}\n", {"origin": ("127.0.0.1", 80)})
    with pytest.raises(ValueError, match="backend name"):
        vcl_with_backends(VCL, {"bad name": ("127.0.0.1", 80)})
    with pytest.raises(ValueError, match="host"):
        vcl_with_backends(VCL, {"origin": ('127.0.0.1"; } evil {', 80)})
    with pytest.raises(ValueError, match="port"):
        vcl_with_backends(VCL, {"origin": ("127.0.0.1", 0)})


# -- meshkit's cache VCL (mesh/varnish/meshkit.vcl) ------------------------------------------------------
SHIPPED = Path(__file__).resolve().parents[2] / "mesh" / "varnish" / "meshkit.vcl"
BEGIN, END = "# ==== meshkit settings: begin ====\n", "# ==== meshkit settings: end ====\n"


def split_settings(vcl: str) -> tuple[str, str, str]:
    """(before, the settings block, after)."""
    head, rest = vcl.split(BEGIN)
    settings, tail = rest.split(END)
    return head, settings, tail


def test_the_shipped_cache_vcl_compiles_as_is(readable_dir: Path) -> None:
    result = varnish_compile(SHIPPED.read_text(), readable_dir)
    assert result.returncode == 0, result.stderr[-2000:]


def test_meshkit_vcl_defaults_are_the_shipped_file() -> None:
    # The file runs as is, and the renderer's defaults are the file's own: one set of defaults.
    assert meshkit_vcl() == shipped_vcl() == SHIPPED.read_text()


@pytest.mark.parametrize(
    "kw",
    [
        {"backend": ("10.1.2.3", 9000), "purgers": ("10.0.0.0/8", "fd00::/8", "192.0.2.7"), "ttl": 60},
        {"backend": ("::1", 8081), "purgers": (), "ttl": 0.5, "grace": 0, "max_body_bytes": 0},
        {"backend": ("localhost", 8080), "grace": 7 * 86400, "max_body_bytes": 64 << 20},
        {"backend": ("127.0.0.1", 8092), "generated_backend": ("127.0.0.1", 8090)},
    ],
)
def test_meshkit_vcl_settings_compile(kw: dict[str, Any], readable_dir: Path) -> None:
    vcl = meshkit_vcl(**kw)
    result = varnish_compile(vcl, readable_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    head, settings, tail = split_settings(vcl)
    host, port = kw["backend"]
    assert f'.host = "{host}";' in settings and f'.port = "{port}";' in settings
    for source in kw.get("purgers", ()):
        address, _, bits = source.partition("/")
        assert (f'"{address}"/{bits};' if bits else f'"{address}";') in settings
    if "ttl" in kw:
        assert f"set beresp.ttl = {kw['ttl']:g}s;" in settings
    if "grace" in kw:
        assert f"set beresp.grace = {kw['grace']:g}s;" in settings
    if "max_body_bytes" in kw:
        assert f'X-Meshkit-Body-Limit = "{kw["max_body_bytes"]}";' in settings
    picks = "set req.backend_hint = generated;\n" in settings
    assert picks == ("generated_backend" in kw)
    shipped_head, _, shipped_tail = split_settings(SHIPPED.read_text())
    assert (head, tail) == (shipped_head, shipped_tail)  # only the settings block differs


def test_meshkit_vcl_values_are_checked() -> None:
    with pytest.raises(ValueError, match="host") as excinfo:
        meshkit_vcl(backend=('a"; } evil {', 80), purgers=("everyone",), ttl=-1, grace=float("nan"))
    for part in ("host", "'everyone' is not an address", "ttl", "grace"):
        assert part in str(excinfo.value)
    with pytest.raises(ValueError, match="port"):
        meshkit_vcl(backend=("127.0.0.1", 70000))
    with pytest.raises(ValueError, match=r"ttl.*finite") as excinfo:  # rendered `infs;` before
        meshkit_vcl(ttl=float("inf"), first_byte_timeout=float("inf"))
    assert "first_byte_timeout" in str(excinfo.value)
    with pytest.raises(ValueError, match="max_body_bytes"):
        meshkit_vcl(max_body_bytes=-1)
    with pytest.raises(ValueError, match="generated_backend: host"):
        meshkit_vcl(generated_backend=("x y", 8090))
    with pytest.raises(ValueError, match="generated_backend: port"):
        meshkit_vcl(generated_backend=("127.0.0.1", 0))
