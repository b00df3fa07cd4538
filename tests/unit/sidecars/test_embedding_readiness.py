"""The embedding cache's readiness check against real sockets: upstream TCP connect, the store probe,
a short cache so a probe storm costs one probe."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

from meshkit.sidecars.embedding_readiness import EmbeddingReadiness, upstream_address
from meshkit.sidecars.vector_store import FileStore


class CountingStore(FileStore):
    probes = 0
    broken = False

    async def probe(self) -> None:
        self.probes += 1
        if self.broken:
            raise PermissionError("read-only file system")
        await super().probe()


def _gauges() -> tuple[CollectorRegistry, Gauge, Gauge]:
    registry = CollectorRegistry()
    return registry, Gauge("store_up", "s", registry=registry), Gauge("upstream_up", "u", registry=registry)


def test_upstream_address() -> None:
    assert upstream_address("https://api.openai.com/v1") == ("api.openai.com", 443)
    assert upstream_address("http://127.0.0.1:8090/v1") == ("127.0.0.1", 8090)
    assert upstream_address("http://upstream/v1") == ("upstream", 80)


def test_ready_follows_the_upstream_the_store_is_reported_and_probes_are_cached(tmp_path: Path) -> None:
    async def run() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        store = CountingStore(tmp_path)
        store.open()
        registry, store_up, upstream_up = _gauges()
        told: list[bool] = []
        check = EmbeddingReadiness(
            store,
            f"http://127.0.0.1:{port}/v1",
            store_up=store_up,
            upstream_up=upstream_up,
            on_store=told.append,
            ttl=0.3,
        )
        results = await asyncio.gather(*(check() for _ in range(50)))  # a storm: one probe
        assert store.probes == 1
        assert results[0] == (True, "serving", {"store": "ok", "upstream": "ok"})
        store.broken = True
        assert (await check())[0] is True and store.probes == 1  # cached
        await asyncio.sleep(0.35)
        ready, reason, details = await check()
        assert ready and "store unreachable" in reason
        assert details["store"] == "unreachable: read-only file system" and told == [True, False]
        assert registry.get_sample_value("store_up") == 0
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.35)
        ready, reason, details = await check()
        assert not ready and reason.startswith("upstream unreachable: 127.0.0.1:")
        assert registry.get_sample_value("upstream_up") == 0

    asyncio.run(run())


def test_an_upstream_that_never_answers_the_connect_is_bounded(tmp_path: Path) -> None:
    async def run() -> None:
        # a listening socket with a full backlog does not complete new handshakes (Linux drops the SYN)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen(0)
            port = sock.getsockname()[1]
            fillers = []
            for _ in range(8):  # until one connect no longer completes
                try:
                    fillers.append(socket.create_connection(("127.0.0.1", port), timeout=0.2))
                except TimeoutError:
                    break
            _, store_up, upstream_up = _gauges()
            check = EmbeddingReadiness(
                FileStore(tmp_path),
                f"http://127.0.0.1:{port}",
                store_up=store_up,
                upstream_up=upstream_up,
                timeout=0.2,
            )
            loop = asyncio.get_running_loop()
            began = loop.time()
            ready, reason, _ = await check()
            assert loop.time() - began < 1
            for filler in fillers:
                filler.close()
        assert not ready and "within 0.2 s" in reason

    asyncio.run(run())
