"""An open-loop, fixed-rate HTTP/1.1 load client: requests start on a schedule, whatever the answers do.

Why not hey: `hey -c C -q R` gives every worker its own ticker, all started together, so C requests leave
at the same instant every C/R seconds — a burst of C at once, not a rate — and each worker waits for its
answer before its next tick, so a slow answer delays the next request instead of being measured (the
coordinated omission wrk2 was written against). On 2 cores shared with Envoy, Varnish and meshkit, the
bursts alone doubled p50.

Here request k is due at `t0 + k / rate` (`--arrivals uniform`) or after exponential gaps of mean
`1 / rate` (`--arrivals poisson`, seeded). A due request goes out on an idle keep-alive connection (the
one idle longest, so all `--connections` carry traffic, as a pool of clients would); when none is idle it
waits in a backlog. Its latency is measured from the moment it was due, so a backlog, a stall or a
late send counts in full ("corrected"); the time from the actual send is reported too ("service").

One process, plain non-blocking sockets and `select()` (microsecond timeouts; epoll's are milliseconds),
the garbage collector off during the run. Its own CPU time is reported, so a row can say when the client
was the bottleneck.

    .venv/bin/python bench/fixed_rate.py --url http://127.0.0.1:PORT/v1/embeddings --rate 500
        --duration 10 [--connections 8] [--body FILE] [-H 'name: value' ...] [--arrivals uniform|poisson]

It prints one JSON object: requests, statuses, x_cache (values of that header), unfinished, errors,
latency_ms / service_ms (every finished request, in completion order), late_ms (how late sends left,
p99 and max), cpu_s and wall_s of the client.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import select
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DRAIN_S = 5.0  # how long answers still due may take after the last send


class ClientError(Exception):
    """The load could not be run as asked (a refused connection, an answer this client cannot read)."""


@dataclass
class Answer:
    status: int
    x_cache: str


@dataclass
class Connection:
    address: tuple[str, int]
    sock: socket.socket = field(init=False)
    buffer: bytearray = field(default_factory=bytearray)
    due: float = 0.0  # when the request in flight was due
    sent: float = 0.0
    busy: bool = False
    _head: tuple[int, int, Answer, bool] | None = None  # header end, body length, answer, close

    def __post_init__(self) -> None:
        self.connect()

    def connect(self) -> None:
        self.sock = socket.create_connection(self.address, timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buffer.clear()
        self._head = None

    def send(self, request: bytes, due: float, now: float) -> None:
        sent = self.sock.send(request)
        if sent != len(request):  # a request of a few KiB into an idle socket's buffer
            raise ClientError(f"only {sent} of {len(request)} request bytes fit the socket buffer")
        self.due, self.sent, self.busy = due, now, True

    def receive(self) -> tuple[Answer, bool] | None:
        """Read what arrived; the answer and whether the server closes, once the whole answer is here."""
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        self.buffer += chunk
        if self._head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return None
            self._head = _parse_head(bytes(self.buffer[:end]), end + 4)
        header_end, length, answer, close = self._head
        if len(self.buffer) < header_end + length:
            return None
        if len(self.buffer) > header_end + length:
            raise ClientError("more bytes than the answer's Content-Length")
        self.buffer.clear()
        self._head = None
        self.busy = False
        return answer, close


def _parse_head(head: bytes, header_end: int) -> tuple[int, int, Answer, bool]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ClientError(f"not an HTTP status line: {lines[0]!r}")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if "content-length" not in fields:
        raise ClientError("an answer without Content-Length (chunked answers are not read here)")
    answer = Answer(int(parts[1]), fields.get("x-cache", ""))
    return header_end, int(fields["content-length"]), answer, fields.get("connection", "").lower() == "close"


def schedule(rate: float, arrivals: str, seed: int) -> Iterator[float]:
    """Offsets from the start at which requests are due."""
    if arrivals == "uniform":
        k = 0
        while True:
            yield k / rate
            k += 1
    rng = random.Random(seed)
    t = 0.0
    while True:
        yield t
        t += rng.expovariate(rate)


def build_request(url: str, body: bytes, headers: Sequence[tuple[str, str]]) -> tuple[tuple[str, int], bytes]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ClientError(f"an http:// URL is needed, not {url!r}")
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"POST {target} HTTP/1.1" if body else f"GET {target} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    return (parts.hostname, port), request


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank `q` quantile of already sorted values (nan when empty); bench/cache_tier.py's too."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def run(
    address: tuple[str, int],
    request: bytes,
    rate: float,
    duration: float,
    connections: int,
    arrivals: str = "uniform",
    seed: int = 1,
) -> dict[str, object]:
    pool = [Connection(address) for _ in range(connections)]
    by_fd = {c.sock.fileno(): c for c in pool}
    idle: deque[Connection] = deque(pool)
    backlog: deque[float] = deque()
    latency: list[float] = []
    service: list[float] = []
    late: list[float] = []
    statuses: dict[str, int] = {}
    x_cache: dict[str, int] = {}
    errors = 0
    offsets = schedule(rate, arrivals, seed)

    def reconnect(conn: Connection) -> None:
        del by_fd[conn.sock.fileno()]
        conn.sock.close()
        conn.connect()
        by_fd[conn.sock.fileno()] = conn

    cpu0, wall0 = time.process_time(), time.perf_counter()
    t0 = wall0 + 0.05
    end = t0 + duration
    next_due = t0 + next(offsets)
    gc.disable()
    try:
        while True:
            now = time.perf_counter()
            while next_due <= now and next_due < end:
                backlog.append(next_due)
                next_due = t0 + next(offsets)
            while backlog and idle:
                conn = idle.popleft()
                due = backlog.popleft()
                try:
                    conn.send(request, due, now)
                except OSError:  # the server closed it while idle (a keep-alive timeout): a new one
                    reconnect(conn)
                    conn.send(request, due, now)
                late.append(now - due)
            in_flight = [c for c in pool if c.busy]
            if next_due >= end and not backlog and not in_flight:
                break
            if now > end + DRAIN_S:
                break
            timeout = max(0.0, next_due - now) if next_due < end else end + DRAIN_S - now
            ready, _, _ = select.select([c.sock for c in in_flight], [], [], max(0.0, timeout))
            done = time.perf_counter()
            for sock in ready:
                conn = by_fd[sock.fileno()]
                try:
                    got = conn.receive()
                except (ConnectionError, OSError):
                    errors += 1
                    reconnect(conn)
                    conn.busy = False
                    idle.append(conn)
                    continue
                if got is None:
                    continue
                answer, close = got
                latency.append((done - conn.due) * 1e3)
                service.append((done - conn.sent) * 1e3)
                statuses[str(answer.status)] = statuses.get(str(answer.status), 0) + 1
                if answer.x_cache:
                    x_cache[answer.x_cache] = x_cache.get(answer.x_cache, 0) + 1
                if close:
                    reconnect(conn)
                idle.append(conn)
    finally:
        gc.enable()
        for conn in pool:
            conn.sock.close()
    unfinished = sum(1 for c in pool if c.busy) + len(backlog)
    return {
        "requests": len(latency),
        "statuses": statuses,
        "x_cache": x_cache,
        "unfinished": unfinished,
        "errors": errors,
        "latency_ms": [round(v, 4) for v in latency],
        "service_ms": [round(v, 4) for v in service],
        "late_ms": {
            "p99": round(percentile(sorted(late), 0.99) * 1e3, 4),
            "max": round(max(late, default=0) * 1e3, 4),
        },
        "cpu_s": round(time.process_time() - cpu0, 4),
        "wall_s": round(time.perf_counter() - wall0, 4),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second, in total")
    parser.add_argument("--duration", type=float, required=True, help="seconds of sending")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--body", type=argparse.FileType("rb"), help="POST this file (else GET)")
    parser.add_argument("-H", "--header", action="append", default=[], help="'name: value'")
    parser.add_argument("--arrivals", choices=("uniform", "poisson"), default="uniform")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.connections < 1:
        parser.error("--rate and --duration must be > 0, --connections >= 1")
    headers = []
    for text in args.header:
        name, sep, value = text.partition(":")
        if not sep or not name.strip():
            parser.error(f"a header is 'name: value', not {text!r}")
        headers.append((name.strip(), value.strip()))
    body = args.body.read() if args.body else b""
    try:
        address, request = build_request(args.url, body, headers)
        result = run(address, request, args.rate, args.duration, args.connections, args.arrivals, args.seed)
    except (ClientError, OSError) as exc:
        print(f"fixed_rate: {exc}", file=sys.stderr)
        return 1
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
