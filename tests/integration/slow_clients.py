"""A slow-header client, run as its own process by the tests: COUNT connections to HOST:PORT, each
sending a request's headers one byte every INTERVAL seconds, never finishing them; a connection the
server closes is opened again after RECONNECT seconds, so COUNT stay open for as long as this runs.
With MODE `idle`, each connection instead sends one whole check and then sits idle (keep-alive), which
costs a client nothing at all.

    python slow_clients.py HOST PORT COUNT [INTERVAL] [RECONNECT] [MODE: slow|idle]

Prints `holding COUNT` once every connection is open (the tests' readiness probe), then a line per
second: `open=N closed_by_server=M`. Runs until killed.
"""

from __future__ import annotations

import asyncio
import resource
import sys

HEADER = b"POST /v1/chat/completions HTTP/1.1\r\nHost: meshkit\r\nX-Slow: " + b"a" * 65536
CHECK = b"POST /v1/chat/completions HTTP/1.1\r\nHost: meshkit\r\nContent-Length: 2\r\n\r\n{}"
CONNECTING_AT_ONCE = 50  # under the server's listen backlog (100), so no SYN waits a retransmit


class Counts:
    def __init__(self) -> None:
        self.open = 0
        self.closed_by_server = 0


async def sit_idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One whole check, then nothing: read until the server closes the connection."""
    writer.write(CHECK)
    while await reader.read(4096):
        pass


async def hold(
    host: str,
    port: int,
    interval: float,
    reconnect: float,
    counts: Counts,
    gate: asyncio.Semaphore,
    idle: bool,
) -> None:
    """One connection, forever: trickle the header; when the server closes it, open another."""
    while True:
        async with gate:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(reconnect)
                continue
        counts.open += 1
        try:
            if idle:
                await sit_idle(reader, writer)
            for byte in b"" if idle else HEADER:
                writer.write(bytes([byte]))
                try:
                    if not await asyncio.wait_for(reader.read(4096), interval):
                        break  # EOF: the server closed it
                except TimeoutError:
                    continue  # still open: the next byte
        except OSError:
            pass  # reset by the server
        finally:
            counts.open -= 1
            counts.closed_by_server += 1
            writer.close()
        await asyncio.sleep(reconnect)


async def report(count: int, counts: Counts) -> None:
    held = False
    while True:
        if not held and counts.open >= count:
            held = True
            print(f"holding {count}", flush=True)
        print(f"open={counts.open} closed_by_server={counts.closed_by_server}", flush=True)
        await asyncio.sleep(1 if held else 0.05)


async def main(host: str, port: int, count: int, interval: float, reconnect: float, idle: bool) -> None:
    counts = Counts()
    gate = asyncio.Semaphore(CONNECTING_AT_ONCE)
    tasks = [
        asyncio.ensure_future(hold(host, port, interval, reconnect, counts, gate, idle)) for _ in range(count)
    ]
    await report(count, counts)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:  # as many descriptors as allowed: COUNT sockets and then some
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    interval = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
    reconnect = float(sys.argv[5]) if len(sys.argv) > 5 else 0.1
    idle = len(sys.argv) > 6 and sys.argv[6] == "idle"
    asyncio.run(main(host, port, count, interval, reconnect, idle))
