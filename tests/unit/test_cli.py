"""The CLI as a user meets it: a real `meshkit` process, exit codes, no tracebacks."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def meshkit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshkit", *args], capture_output=True, text=True, timeout=30, env=env
    )


def test_bad_options_exit_2_with_every_problem_and_no_traceback() -> None:
    result = meshkit("extproc", "--hash", "md5", "--max-body-bytes", "huge", "--filters", "body-hash,nope")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for needle in ("--hash: 'md5'", "--max-body-bytes: 'huge'", "unknown filter nope"):
        assert needle in result.stderr


def test_env_and_yaml_config(tmp_path: Path) -> None:
    cfg = tmp_path / "meshkit.yaml"
    cfg.write_text("extproc:\n  hash: sha3\n")
    result = meshkit("extproc", "--config", str(cfg), env={"MESHKIT_EXTPROC_LISTEN": "nowhere", "PATH": ""})
    assert result.returncode == 2
    assert "MESHKIT_EXTPROC_LISTEN: 'nowhere'" in result.stderr
    assert "extproc.hash in --config: 'sha3'" in result.stderr


def test_port_in_use_exits_1_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = meshkit("extproc", "--listen", "127.0.0.1:0", "--admin-listen", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port} (--admin-listen)" in result.stderr


@pytest.mark.parametrize("command", ["extproc", "up", "echo"])
def test_help(command: str) -> None:
    result = meshkit(command, "--help")
    assert result.returncode == 0
    assert "usage: meshkit" in result.stdout


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("extproc:\n  1: 2\n", "extproc.1 in --config: unknown option"),
        ("extproc:\n  filters: [1, 2]\n", "unknown filter 1, 2"),
        ("extproc:\n  max_body_bytes: 3GiB\n", "at most 1073741824 bytes"),
        ("extproc:\n  drain_delay: inf\n", "finite number of seconds"),
        ("extproc:\n  http_max_connections: -1\n", "expected a whole number, 0 or more"),
        ("extproc:\n  filter_timeout: 0\n", "must be more than 0 seconds"),
    ],
)
def test_odd_config_values_are_reported_not_raised(tmp_path: Path, yaml_text: str, needle: str) -> None:
    cfg = tmp_path / "meshkit.yaml"
    cfg.write_text(yaml_text)
    result = meshkit("extproc", "--config", str(cfg))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert needle in result.stderr


def test_config_that_is_not_utf8(tmp_path: Path) -> None:
    cfg = tmp_path / "meshkit.yaml"
    cfg.write_bytes(b"extproc:\n  hash: \xff\xfe\n")
    result = meshkit("extproc", "--config", str(cfg))
    assert result.returncode == 2
    assert "not UTF-8" in result.stderr


def test_echo_port_in_use_exits_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = meshkit("echo", "--listen", f"127.0.0.1:{taken.getsockname()[1]}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cannot listen on" in result.stderr


def test_option_names_are_unique_across_every_daemon_and_its_filters() -> None:
    """Flags are flat (`--canonical-json`, later `--jwt-secret-file`): two sections may never declare
    the same name. This is where a clash is caught, not in a traceback at start-up."""
    from meshkit.cli import DAEMONS, load_daemon
    from meshkit.options import clashes

    for command in DAEMONS:
        spec = load_daemon(command)
        assert spec.name == command
        assert clashes(spec.all_sections()) == [], command


def test_a_clash_is_found() -> None:
    from dataclasses import dataclass

    from meshkit.daemon import DaemonOptions
    from meshkit.options import clashes, option

    @dataclass(frozen=True)
    class Clashing:
        log_level: str = option("x", "a second log_level")

    assert clashes([DaemonOptions, Clashing]) == [
        "option 'log_level' declared by both DaemonOptions and Clashing"
    ]

    @dataclass(frozen=True)
    class Reserved:
        config: str = option("", "would be a second --config: argparse's traceback at start-up")
        command: str = option("", "would overwrite the subcommand's name in the parsed flags")

    assert clashes([Reserved]) == [
        "option 'config' of Reserved is reserved by the CLI (--config)",
        "option 'command' of Reserved is reserved by the CLI (--command)",
    ]


def test_yaml_may_group_a_filters_options_under_its_name(tmp_path: Path) -> None:
    cfg = tmp_path / "meshkit.yaml"
    cfg.write_text("extproc:\n  body-hash:\n    canonical_json: yes\n    hash: md5\n    nope: 1\n")
    result = meshkit("extproc", "--config", str(cfg))
    assert result.returncode == 2
    assert "extproc.body-hash.hash in --config: 'md5' is not valid" in result.stderr
    assert "extproc.body-hash.nope in --config: unknown option of body-hash" in result.stderr


def test_a_new_daemon_is_one_module_and_one_registry_line() -> None:
    """Every DAEMONS entry names a module whose DAEMON is a meshkit.daemon.Daemon; the CLI builds the
    rest (flags, env, YAML, the run loop) from it."""
    from meshkit.cli import COMMANDS, DAEMONS, load_daemon
    from meshkit.daemon import Daemon

    for command in DAEMONS:
        spec = load_daemon(command)
        assert isinstance(spec, Daemon)
        assert command in COMMANDS
        # the registry line carries the help so `meshkit --help` imports no daemon; one text, not two
        assert spec.help == DAEMONS[command][1], command


PROBE_FILTER = """
import sys
from dataclasses import dataclass
from typing import ClassVar
from meshkit.extproc import Filter
from meshkit.extproc.filters import FILTERS

@dataclass(frozen=True)
class NoOptions:
    pass

class Broken(Filter):
    name: ClassVar[str] = "broken"
    Options: ClassVar[type] = NoOptions

    async def start(self) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

class Typo(Filter):
    name: ClassVar[str] = "typo"
    Options: ClassVar[type] = NoOptions

    def on_request_header(self, exchange):  # missing "s"
        pass

class BadInit(Filter):
    name: ClassVar[str] = "bad-init"
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: NoOptions) -> None:
        raise RuntimeError("a bug in the filter")

FILTERS["broken"] = Broken
FILTERS["typo"] = Typo
FILTERS["bad-init"] = BadInit
from meshkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_filter_start_that_raises_exits_1_with_one_line_and_json_logs_stay_json() -> None:
    """A filter's start() raising something unexpected: exit 1, one last line naming the filter, and
    the traceback inside the JSON log (it was a bare traceback on stderr)."""
    args = ["--filters", "broken", "--log-format", "json", "--listen", "127.0.0.1:0"]
    result = subprocess.run(
        [sys.executable, "-c", PROBE_FILTER, "extproc", *args, "--admin-listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    *logged, last = result.stderr.strip().splitlines()
    assert last == (
        "meshkit extproc: filter broken did not start: ConnectionRefusedError: [Errno 111] Connection refused"
    )
    docs = [json.loads(line) for line in logged]  # every log line is JSON
    assert any("Traceback" in doc.get("exc", "") for doc in docs)


@pytest.mark.parametrize("command", ["extproc", "render"])
def test_a_misspelt_hook_is_one_line_exit_1_not_a_traceback(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE_FILTER, command, "--filters", "typo"]
        + (["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"] if command == "extproc" else []),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"meshkit {command}: filter 'typo': on_request_header() is not a phase hook")
    )


def test_a_bug_at_start_up_keeps_its_traceback_inside_the_json_log() -> None:
    """Not the user's mistake, so the traceback is shown, but through the log: with --log-format json
    every line stays JSON (it was a bare traceback on stderr)."""
    args = ["--filters", "bad-init", "--log-format", "json", "--listen", "127.0.0.1:0"]
    result = subprocess.run(
        [sys.executable, "-c", PROBE_FILTER, "extproc", *args, "--admin-listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    docs = [json.loads(line) for line in result.stderr.strip().splitlines()]
    (failed,) = [d for d in docs if d["msg"] == "meshkit extproc stopped on an unexpected error"]
    assert "RuntimeError: a bug in the filter" in failed["exc"]
