"""Real child processes: started in their own session, readiness read from the process, always stopped.

`ManagedProcess` is the one piece every server launcher in `meshkit.harness` builds on:

- the child runs in a new session (its own process group), so stopping it stops everything it forked;
- stdout and stderr go to a log file, never to an unread pipe; `tail()` shows the end of it;
- `start()` returns only once `ready()` says so, or raises `HarnessError` with the log tail when the
  process exits first or the deadline passes (there is no bare sleep anywhere);
- `stop()` sends SIGTERM to the group, waits up to `stop_timeout`, then SIGKILLs the group.

Every process started is also remembered in a module registry, so `stop_all()` (called from an `atexit`
hook and from the signal handlers that `meshkit up` and the tests install) leaves nothing behind.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from meshkit.errors import HarnessError

Probe = Callable[["ManagedProcess"], bool]
T = TypeVar("T")

_RUNNING: dict[int, ManagedProcess] = {}
_STARTED: collections.deque[tuple[int, ManagedProcess]] = collections.deque(maxlen=64)  # stopped or not
_STARTS = itertools.count()
_POLL_INTERVAL = 0.02


class ManagedProcess:
    """One child process with a log file, a readiness probe and a guaranteed stop."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str | Path],
        *,
        log_dir: Path,
        ready: Probe | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_dir) / f"{name}.log"
        self._ready = ready
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> ManagedProcess:
        if self._proc is not None:
            raise HarnessError(f"{self.name}: already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        _set_aside(self.log_path)
        env = {**os.environ, **self._env} if self._env is not None else None
        with self.log_path.open("wb") as log:
            try:
                self._proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self._cwd,
                    start_new_session=True,
                )
            except OSError as exc:
                raise HarnessError(f"{self.name}: cannot start {self.argv[0]!r}: {exc}") from exc
        _RUNNING[self._proc.pid] = self
        _STARTED.append((next(_STARTS), self))
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = self.returncode
            if code is not None:
                raise HarnessError(
                    f"{self.name} exited with status {code} before it was ready\n{self.tail()}"
                )
            if self._ready is None or self._ready(self):
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"{self.name} not ready after {self.start_timeout:.0f} s\n{self.tail()}")
            time.sleep(_POLL_INTERVAL)

    def stop(self) -> int | None:
        """TERM the process group, wait up to `stop_timeout`, then KILL it. Idempotent."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # The leader is gone; anything it forked into its group must go too.
        _signal_group(proc.pid, signal.SIGKILL)
        _RUNNING.pop(proc.pid, None)
        return proc.returncode

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the leader only (as a supervisor would), not to its whole group."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the exit status (raises HarnessError after `timeout` seconds)."""
        if self._proc is None:
            raise HarnessError(f"{self.name}: not started")
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(f"{self.name} still running after {timeout:.0f} s\n{self.tail()}") from None

    def kill(self) -> None:
        """SIGKILL the whole group at once (a crash, for tests)."""
        if self._proc is not None and self._proc.poll() is None:
            _signal_group(self._proc.pid, signal.SIGKILL)
            self._proc.wait(5)

    # -- inspection ------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        if self._proc is None:
            raise HarnessError(f"{self.name}: not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        text = self.log_text().splitlines()[-lines:]
        return f"--- last {len(text)} lines of {self.log_path} ---\n" + "\n".join(text)

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc else None
        return f"ManagedProcess({self.name!r}, pid={pid})"


def _set_aside(log_path: Path) -> None:
    """Move an earlier run's log to `<name>.N.log`: its old "ready" line and ports must not pass as ours."""
    if not log_path.exists():
        return
    n = 1
    while (old := log_path.with_name(f"{log_path.stem}.{n}{log_path.suffix}")).exists():
        n += 1
    log_path.rename(old)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def running() -> list[ManagedProcess]:
    return list(_RUNNING.values())


def started_count() -> int:
    """How many processes were started so far: a mark for `started_since()`."""
    return _STARTED[-1][0] + 1 if _STARTED else 0


def started_since(mark: int) -> list[ManagedProcess]:
    """The processes started after `started_count()` returned `mark` (of the latest 64), stopped or
    not: a failed test can show the log of a daemon its `with` block already stopped."""
    return [proc for index, proc in _STARTED if index >= mark]


def stop_all() -> None:
    """Stop every process this interpreter started and has not stopped yet, newest first."""
    for proc in reversed(list(_RUNNING.values())):
        proc.stop()


atexit.register(stop_all)


# -- readiness probes -----------------------------------------------------------------------------
def log_matches(pattern: str) -> Probe:
    """Ready once the log contains a line matching `pattern` (a regular expression)."""
    regex = re.compile(pattern, re.MULTILINE)
    return lambda proc: regex.search(proc.log_text()) is not None


def log_match(proc: ManagedProcess, pattern: str) -> re.Match[str]:
    """The first match of `pattern` in the log of a process that is ready (raises if absent)."""
    match = re.search(pattern, proc.log_text(), re.MULTILINE)
    if match is None:
        raise HarnessError(f"{proc.name}: no line matching {pattern!r}\n{proc.tail()}")
    return match


def tcp_accepts(host: str, port: int) -> Probe:
    def probe(_: ManagedProcess) -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    return probe


def http_ok(url: str) -> Probe:
    def probe(_: ManagedProcess) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:  # noqa: S310 - loopback URL we built
                return 200 <= int(resp.status) < 300
        except (urllib.error.URLError, OSError):
            return False

    return probe


def start_on_free_ports(
    make: Callable[[], tuple[ManagedProcess, T]], bind_failed: Callable[[str], bool], attempts: int = 3
) -> tuple[ManagedProcess, T]:
    """Start what `make()` builds (it picks fresh ports with `free_port` each call) and return it with
    its ports; when the start fails because a port was taken in the meantime (`bind_failed(log)`),
    try again with new ports, up to `attempts` times."""
    for attempt in range(1, attempts + 1):
        proc, ports = make()
        try:
            proc.start()
        except HarnessError:
            if attempt < attempts and bind_failed(proc.log_text()):
                continue
            raise
        return proc, ports
    raise AssertionError("unreachable: the last attempt returns or raises")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago. Only for servers that cannot bind port 0 and report back."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
