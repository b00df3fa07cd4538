"""The harness leaves nothing behind: not after a failing test, not after Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meshkit.harness.process import ManagedProcess, log_matches

from .test_local_stack import alive

pytestmark = pytest.mark.integration

STARTS_SERVERS = """
    from pathlib import Path
    from meshkit.harness.daemons import echo, extproc

    def start(workdir, pids_file):
        ctx_echo, ctx_extproc = echo(workdir), extproc(workdir)
        upstream, server = ctx_echo.__enter__(), ctx_extproc.__enter__()
        Path(pids_file).write_text(f"{upstream.process.pid} {server.process.pid}")
        print("servers up", flush=True)
        return ctx_echo, ctx_extproc
"""


def pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()]


def test_failing_test_leaves_nothing(tmp_path: Path) -> None:
    test_file = tmp_path / "test_fails.py"
    test_file.write_text(
        textwrap.dedent(STARTS_SERVERS)
        + textwrap.dedent(f"""
        import pytest
        from meshkit.harness.daemons import echo, extproc

        def test_fails(tmp_path):
            with echo(tmp_path) as upstream, extproc(tmp_path) as server:
                pids = f"{{upstream.process.pid}} {{server.process.pid}}"
                Path({str(tmp_path / "pids")!r}).write_text(pids)
                assert False, "this test fails on purpose"
    """)
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(test_file),
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout
    assert "this test fails on purpose" in result.stdout
    started = pids(tmp_path / "pids")
    assert len(started) == 2
    assert not [p for p in started if alive(p)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    script = tmp_path / "hold.py"
    script.write_text(
        textwrap.dedent(STARTS_SERVERS)
        + textwrap.dedent(f"""
        import signal, threading
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # as `meshkit up` does
        contexts = start(Path({str(tmp_path)!r}), {str(tmp_path / "pids")!r})
        threading.Event().wait()
    """)
    )
    holder = ManagedProcess(
        "holder",
        [sys.executable, str(script)],
        log_dir=tmp_path / "logs",
        ready=log_matches("servers up"),
        start_timeout=60,
    )
    with holder:
        started = pids(tmp_path / "pids")
        assert all(alive(p) for p in started)
        holder.signal(sig)
        holder.wait(30)
    assert not [p for p in started if alive(p)]
