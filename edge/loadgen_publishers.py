"""Where the load generator publishes token messages: NATS, Redis (pub/sub or a Stream, for the bridge),
or nchan's HTTP publisher. One `Publisher` interface, chosen by `--publish`.

Every message follows the contract (`meshkit.edge.token_contract`): `{"conversation_id", "token",
"sequence", "done", "ts"}` with `ts = time.time()` taken when the message is handed to the client (the
viewers compute publish->receive latency from it, on the same machine's clock).

- `nats`: a core publish on `chat.<id>.tokens` with `Nats-Msg-Id: <id>:<sequence>` (a JetStream stream
  on those subjects stores each once; nothing waits for a PubAck, as a bridge would). Flushed per batch.
- `redis-pubsub`: `PUBLISH chat.<id>.tokens <json>`; `redis-stream`: `XADD <key> * data <json>` (key
  `chat.tokens` by default): both pipelined per batch, one round trip per tick.
- `nchan`: `POST <url>/pub/<id>` with the JSON as body, the batch's posts concurrently on a pool of
  keep-alive connections (`MAX_HTTP_CONNECTIONS`); a status other than 200/201/202 is an error.

A batch is what the scheduler found due in one tick; `publish_batch` returns when the batch is sent
(written to the socket for NATS, answered for Redis and HTTP), so a slow target slows the schedule
down, and the achieved rate in the report shows it. Errors are counted (`errors`, first message kept),
never raised mid-run; a publisher that cannot connect at start raises `DependencyError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from typing import Protocol

import aiohttp

from meshkit.edge.token_contract import message_id, tokens_subject
from meshkit.errors import DependencyError
from meshkit.nats_flush import flushed

__all__ = [
    "PUBLISHERS",
    "Message",
    "Publisher",
    "make_publisher",
    "token_payload",
]

MAX_HTTP_CONNECTIONS = 32
CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0
DEFAULT_STREAM_KEY = "chat.tokens"

Message = tuple[str, int, bool]  # conversation_id, sequence, done


def token_payload(conversation_id: str, sequence: int, done: bool, *, token: str | None = None) -> bytes:
    """One contract message with `ts` = now."""
    return json.dumps(
        {
            "conversation_id": conversation_id,
            "token": "" if done else (token if token is not None else f"t{sequence} "),
            "sequence": sequence,
            "done": done,
            "ts": time.time(),
        },
        separators=(",", ":"),
    ).encode()


class Publisher(Protocol):
    name: str
    errors: int
    first_error: str | None

    async def start(self) -> None: ...

    async def publish_batch(self, messages: Sequence[Message]) -> None: ...

    async def close(self) -> None: ...


class _Errors:
    errors = 0
    first_error: str | None = None

    def _failed(self, what: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = what


class NatsPublisher(_Errors):
    name = "nats"

    def __init__(self, url: str) -> None:
        self.url = url
        self._nc: object | None = None

    async def start(self) -> None:
        import nats

        async def on_error(exc: Exception) -> None:  # nats-py's default prints a traceback
            self._failed(f"nats: {exc!r}")

        try:
            self._nc = await nats.connect(
                self.url,
                connect_timeout=CONNECT_TIMEOUT,
                max_reconnect_attempts=3,
                allow_reconnect=True,
                error_cb=on_error,
            )
        except Exception as exc:  # nats-py raises several unrelated types
            raise DependencyError("nats", f"cannot connect to {self.url}: {exc}") from None

    async def publish_batch(self, messages: Sequence[Message]) -> None:
        from nats.aio.client import Client

        nc = self._nc
        assert isinstance(nc, Client)
        try:
            for cid, seq, done in messages:
                await nc.publish(
                    tokens_subject(cid),
                    token_payload(cid, seq, done),
                    headers={"Nats-Msg-Id": message_id(cid, seq)},
                )
            await flushed(nc, REQUEST_TIMEOUT)
        except Exception as exc:
            self._failed(f"nats publish: {exc!r}")

    async def close(self) -> None:
        from nats.aio.client import Client

        if isinstance(self._nc, Client):
            with contextlib.suppress(Exception):  # closing after the measurement: nothing left to report
                await asyncio.wait_for(self._nc.drain(), REQUEST_TIMEOUT)


class RedisPublisher(_Errors):
    def __init__(self, url: str, *, stream_key: str | None) -> None:
        self.url = url
        self.stream_key = stream_key
        self.name = "redis-stream" if stream_key else "redis-pubsub"
        self._redis: object | None = None

    async def start(self) -> None:
        import redis.asyncio as aioredis

        client = aioredis.from_url(
            self.url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=REQUEST_TIMEOUT
        )
        try:
            await client.ping()
        except Exception as exc:
            await client.aclose()
            raise DependencyError("redis", f"cannot reach {self.url}: {exc}") from None
        self._redis = client

    async def publish_batch(self, messages: Sequence[Message]) -> None:
        import redis.asyncio as aioredis

        client = self._redis
        assert isinstance(client, aioredis.Redis)
        pipe = client.pipeline(transaction=False)
        for cid, seq, done in messages:
            payload = token_payload(cid, seq, done)
            if self.stream_key:
                pipe.xadd(self.stream_key, {"data": payload})
            else:
                pipe.publish(tokens_subject(cid), payload)
        try:
            await pipe.execute()
        except Exception as exc:
            self._failed(f"redis: {exc!r}")

    async def close(self) -> None:
        import redis.asyncio as aioredis

        if isinstance(self._redis, aioredis.Redis):
            await self._redis.aclose()


class NchanPublisher(_Errors):
    name = "nchan"

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_HTTP_CONNECTIONS),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, sock_connect=CONNECT_TIMEOUT),
        )

    async def _post(self, cid: str, seq: int, done: bool) -> None:
        assert self._session is not None
        try:
            async with self._session.post(
                f"{self.base_url}/pub/{cid}",
                data=token_payload(cid, seq, done),
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            ) as resp:
                await resp.read()
                if resp.status not in (200, 201, 202):
                    self._failed(f"POST /pub/{cid}: status {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._failed(f"POST /pub/{cid}: {exc!r}")

    async def publish_batch(self, messages: Sequence[Message]) -> None:
        await asyncio.gather(*(self._post(cid, seq, done) for cid, seq, done in messages))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


PUBLISHERS = ("nats", "redis-pubsub", "redis-stream", "nchan")


def make_publisher(
    kind: str, *, nats_url: str | None, redis_url: str | None, nchan_url: str | None, stream_key: str
) -> Publisher:
    """The publisher for `--publish kind`; a ValueError naming the missing URL option."""
    if kind == "nats":
        if not nats_url:
            raise ValueError("--publish nats needs --nats URL")
        return NatsPublisher(nats_url)
    if kind in ("redis-pubsub", "redis-stream"):
        if not redis_url:
            raise ValueError(f"--publish {kind} needs --redis URL")
        return RedisPublisher(redis_url, stream_key=stream_key if kind == "redis-stream" else None)
    if kind == "nchan":
        if not nchan_url:
            raise ValueError("--publish nchan needs --url (or --pub-url) of nginx + nchan")
        return NchanPublisher(nchan_url)
    raise ValueError(f"--publish {kind!r}: allowed: {', '.join(PUBLISHERS)}")
