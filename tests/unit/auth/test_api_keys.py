"""API keys: the key file's format and every refusal, expiry and revocation, the file reloaded on change
(a broken file keeps the last good table), and keys in Redis through a fake client (cache, negative
cache, errors, bad entries)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshkit.errors import ConfigError, DependencyError
from meshkit.extproc.auth.api_keys import ApiKey, ApiKeyFile, RedisApiKeys, digest_of, parse_key_table
from meshkit.extproc.auth.identity import AuthFailure

KEY = "mk_test_0123456789abcdef"
DIGEST = hashlib.sha256(KEY.encode()).hexdigest()
OTHER = "mk_other_0123456789abcdef"
OTHER_DIGEST = hashlib.sha256(OTHER.encode()).hexdigest()


def entry(**fields: Any) -> dict[str, Any]:
    return {"sha256": DIGEST, "subject": "svc", **fields}


def dump(*entries: dict[str, Any]) -> str:
    return yaml.safe_dump(list(entries))


# -- the format ---------------------------------------------------------------------------------------
def test_documented_format_as_a_top_level_list() -> None:
    text = f"""
- sha256: {DIGEST}
  subject: billing-service
  scopes: [embeddings, llm]
  expires_at: 2027-06-30T00:00:00Z
  rate_limit: 600
  comment: rotated 2026-01
- sha256: {OTHER_DIGEST.upper()}
  subject: billing-service
  revoked: true
"""
    table = parse_key_table(text, "keys.yaml")
    assert set(table) == {DIGEST, OTHER_DIGEST}  # upper-case hex is read as the same digest
    key = table[DIGEST]
    assert key == ApiKey(DIGEST, "billing-service", frozenset({"embeddings", "llm"}), 1814313600.0, 600)
    assert table[OTHER_DIGEST].revoked
    assert table[OTHER_DIGEST].scopes == frozenset()


def test_keys_mapping_form_quoted_time_and_scope_string() -> None:
    text = yaml.safe_dump(
        {"keys": [entry(scopes="a b", expires_at="2027-06-30T02:00:00+02:00")]}, default_flow_style=False
    )
    key = parse_key_table(text, "k")[DIGEST]
    assert key.scopes == frozenset({"a", "b"})
    assert key.expires_at == 1814313600.0


@pytest.mark.parametrize("text", ["", "# nothing\n", "keys:\n", "[]"])
def test_empty_tables(text: str) -> None:
    assert parse_key_table(text, "k") == {}


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"sha256": "abc"}, "sha256 must be 64 hex digits"),
        ({"sha256": "g" * 64}, "sha256 must be 64 hex digits"),
        ({"sha256": KEY}, "never the key"),  # the key itself given instead of its digest
        ({"sha256": None}, "sha256 must be 64 hex digits"),
        ({"subject": ""}, "subject must be"),
        ({"subject": None}, "subject must be"),
        ({"subject": 42}, "subject must be"),
        ({"subject": "a\nb"}, "subject must be"),
        ({"subject": "x" * 257}, "subject must be"),
        ({"scopes": ["a b"]}, "scopes must be"),
        ({"scopes": [""]}, "scopes must be"),
        ({"scopes": ["ok", 3]}, "scopes must be"),
        ({"scopes": {"a": 1}}, "scopes must be"),
        ({"scopes": ['quo"te']}, "scopes must be"),
        ({"expires_at": "tomorrow"}, "expires_at"),
        ({"expires_at": "2027-06-30T00:00:00"}, "expires_at: needs a time zone"),
        ({"expires_at": [1]}, "expires_at: expected an RFC 3339 time"),
        ({"expires_at": True}, "expires_at: expected an RFC 3339 time"),
        ({"rate_limit": 0}, "rate_limit must be"),
        ({"rate_limit": -5}, "rate_limit must be"),
        ({"rate_limit": True}, "rate_limit must be"),
        ({"rate_limit": 1.5}, "rate_limit must be"),
        ({"rate_limit": "10"}, "rate_limit must be"),
        ({"revoked": "yes"}, "revoked must be true or false"),
        ({"revoked": 1}, "revoked must be true or false"),
        ({"key": KEY}, "unknown key(s) key"),
        ({"scope": "a", "expires": 1}, "unknown key(s) expires, scope"),
    ],
)
def test_bad_fields_name_the_entry(fields: dict[str, Any], needle: str) -> None:
    good = {"sha256": OTHER_DIGEST, "subject": "fine"}
    text = dump(good, entry(**fields))
    with pytest.raises(ValueError) as info:
        parse_key_table(text, "keys.yaml")
    message = str(info.value)
    assert message.startswith("keys.yaml: entry 1: "), message
    assert needle in message
    assert KEY not in message  # never echoes a key


def test_a_naive_yaml_timestamp_is_refused() -> None:
    with pytest.raises(ValueError, match="entry 0: expires_at: needs a time zone"):
        parse_key_table(f"- {{sha256: {DIGEST}, subject: s, expires_at: 2027-06-30 00:00:00}}\n", "k")


def test_a_date_without_time_is_refused() -> None:
    with pytest.raises(ValueError, match="entry 0: expires_at"):
        parse_key_table(f"- {{sha256: {DIGEST}, subject: s, expires_at: 2027-06-30}}\n", "k")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("- [a, b]\n", "entry 0: expected a mapping"),
        ("just-a-string\n", "expected a list of keys"),
        ("{other: 1}\n", "expected a list of keys"),
        ("- {sha256: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_documents(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_key_table(text, "k")


def test_duplicate_digests_are_refused_case_insensitively() -> None:
    text = dump(entry(subject="a"), entry(sha256=DIGEST.upper(), subject="b"))
    with pytest.raises(ValueError, match="entry 1: the same sha256 appears twice"):
        parse_key_table(text, "k")


def test_several_keys_per_subject_for_rotation() -> None:
    table = parse_key_table(dump(entry(), {"sha256": OTHER_DIGEST, "subject": "svc"}), "k")
    assert {k.subject for k in table.values()} == {"svc"} and len(table) == 2


# -- ApiKey.identity ---------------------------------------------------------------------------------
def test_identity_carries_the_key_fields() -> None:
    key = ApiKey(DIGEST, "svc", frozenset({"a"}), expires_at=100.0, rate_limit=7)
    ident = key.identity(99.9)
    assert (ident.subject, ident.method, ident.scopes, ident.expires_at, ident.rate_limit) == (
        "svc",
        "api-key",
        frozenset({"a"}),
        100.0,
        7,
    )


def test_identity_expired_at_the_instant() -> None:
    key = ApiKey(DIGEST, "svc", frozenset(), expires_at=100.0)
    with pytest.raises(AuthFailure) as info:
        key.identity(100.0)
    assert info.value.reason == "expired"


def test_identity_revoked_wins_over_valid_time() -> None:
    key = ApiKey(DIGEST, "svc", frozenset(), expires_at=None, revoked=True)
    with pytest.raises(AuthFailure) as info:
        key.identity(0.0)
    assert info.value.reason == "revoked"


def test_digest_of_matches_sha256sum() -> None:
    assert digest_of(KEY) == DIGEST


# -- the key file ------------------------------------------------------------------------------------
async def wait_until(condition: Callable[[], bool], within: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_file_loads_looks_up_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(dump(entry(scopes=["a"])))
    keys = ApiKeyFile(str(path), poll_interval=0.02)
    await keys.start()
    try:
        assert len(keys) == 1
        found = keys.lookup(KEY)
        assert found is not None and found.scopes == frozenset({"a"})
        assert keys.lookup(OTHER) is None
        assert keys.lookup_digest(DIGEST) is found
        # an atomic replace (a new inode) with a second key
        new = tmp_path / "keys.new"
        new.write_text(dump(entry(scopes=["b"]), {"sha256": OTHER_DIGEST, "subject": "o"}))
        os.replace(new, path)
        await wait_until(lambda: keys.lookup(OTHER) is not None)
        assert len(keys) == 2
        assert keys.lookup(KEY).scopes == frozenset({"b"})  # type: ignore[union-attr]
    finally:
        await keys.close()


async def test_a_broken_file_keeps_the_last_good_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshkit.extproc.auth.api_keys")
    path = tmp_path / "keys.yaml"
    path.write_text(dump(entry()))
    keys = ApiKeyFile(str(path), poll_interval=0.02)
    await keys.start()
    try:
        path.write_text("- {sha256: nope, subject: x}\n")
        await wait_until(lambda: "not reloaded" in caplog.text)
        assert keys.lookup(KEY) is not None  # still the last good table
        assert "sha256 must be 64 hex digits" in caplog.text
        await asyncio.sleep(0.1)
        assert caplog.text.count("not reloaded") == 1  # said once per distinct problem
        path.unlink()
        await wait_until(lambda: "cannot read" in caplog.text)
        assert keys.lookup(KEY) is not None
        path.write_text(dump({"sha256": OTHER_DIGEST, "subject": "o"}))
        await wait_until(lambda: keys.lookup(OTHER) is not None)
        assert keys.lookup(KEY) is None
        assert "valid again" in caplog.text
    finally:
        await keys.close()


async def test_a_write_finished_while_a_broken_read_was_parsed_is_still_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that is not atomic: the poll reads a half-written file; the write ends before the parse
    fails. The finished file must still be loaded (its stamp is not the one that failed)."""
    path = tmp_path / "keys.yaml"
    path.write_text(dump(entry()))
    keys = ApiKeyFile(str(path), poll_interval=0.02)
    await keys.start()
    real_read = Path.read_text
    good = dump(entry(), {"sha256": OTHER_DIGEST, "subject": "o"})

    def half_then_finish(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == path and path.read_bytes() == b"-":
            path.write_text(good)  # the writer finishes right after this read
            return "-"  # what the read saw: the first byte
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", half_then_finish)
    try:
        path.write_text("-")
        await wait_until(lambda: keys.lookup(OTHER) is not None, within=2.0)
    finally:
        await keys.close()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("- {sha256: short, subject: x}\n", "sha256 must be 64 hex digits"),
        (None, "cannot read"),
        (b"\xff\xfe- broken", "utf-8"),
    ],
)
async def test_a_broken_file_at_start_is_a_config_error(
    tmp_path: Path, content: str | bytes | None, needle: str
) -> None:
    path = tmp_path / "keys.yaml"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    keys = ApiKeyFile(str(path))
    with pytest.raises(ConfigError) as info:
        await keys.start()
    assert "--api-keys-file" in str(info.value)
    assert needle in str(info.value)
    await keys.close()


# -- Redis -------------------------------------------------------------------------------------------
class FakeRedis:
    def __init__(self) -> None:
        self.hashes: dict[str, dict[bytes, bytes]] = {}
        self.calls: list[str] = []
        self.error: Exception | None = None

    async def hgetall(self, name: str) -> dict[bytes, bytes]:
        self.calls.append(name)
        if self.error is not None:
            raise self.error
        return dict(self.hashes.get(name, {}))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def redis_keys(fake: FakeRedis, clock: Clock, **kwargs: Any) -> RedisApiKeys:
    return RedisApiKeys(fake, clock=clock, **kwargs)


async def test_redis_key_found_and_cached_for_the_ttl() -> None:
    fake, clock = FakeRedis(), Clock()
    fake.hashes[f"meshkit:apikey:{DIGEST}"] = {
        b"subject": b"svc",
        b"scopes": b"a b",
        b"rate_limit": b"30",
        b"expires_at": b"2027-06-30T00:00:00Z",
    }
    keys = redis_keys(fake, clock)
    found = await keys.lookup_digest(DIGEST)
    assert found == ApiKey(DIGEST, "svc", frozenset({"a", "b"}), 1814313600.0, 30)
    fake.hashes[f"meshkit:apikey:{DIGEST}"][b"revoked"] = b"1"
    clock.now += 4.9
    assert await keys.lookup_digest(DIGEST) == found  # cached
    assert len(fake.calls) == 1
    clock.now += 0.2  # past the 5 s TTL: asked again, now revoked
    again = await keys.lookup_digest(DIGEST)
    assert again is not None and again.revoked
    assert len(fake.calls) == 2


async def test_redis_unknown_key_is_cached_too() -> None:
    fake, clock = FakeRedis(), Clock()
    keys = redis_keys(fake, clock, cache_ttl=2.0, prefix="p:")
    assert await keys.lookup_digest(DIGEST) is None
    assert fake.calls == [f"p:apikey:{DIGEST}"]
    fake.hashes[f"p:apikey:{DIGEST}"] = {b"subject": b"svc"}
    clock.now += 1.9
    assert await keys.lookup_digest(DIGEST) is None
    clock.now += 0.2
    assert await keys.lookup_digest(DIGEST) is not None


async def test_redis_cache_is_bounded() -> None:
    fake, clock = FakeRedis(), Clock()
    keys = redis_keys(fake, clock, cache_size=1)
    await keys.lookup_digest(DIGEST)
    await keys.lookup_digest(OTHER_DIGEST)
    await keys.lookup_digest(DIGEST)  # evicted by the other: asked again
    assert len(fake.calls) == 3


async def test_redis_error_is_a_dependency_error_and_not_cached() -> None:
    fake, clock = FakeRedis(), Clock()
    fake.error = ConnectionError("refused")
    keys = redis_keys(fake, clock)
    with pytest.raises(DependencyError) as info:
        await keys.lookup_digest(DIGEST)
    assert info.value.dependency == "redis"
    fake.error = None
    fake.hashes[f"meshkit:apikey:{DIGEST}"] = {b"subject": b"svc"}
    assert await keys.lookup_digest(DIGEST) is not None


@pytest.mark.parametrize(
    "fields",
    [
        {b"scopes": b"a"},  # no subject
        {b"subject": b""},
        {b"subject": b"svc", b"rate_limit": b"lots"},
        {b"subject": b"svc", b"rate_limit": b"0"},
        {b"subject": b"svc", b"rate_limit": "\u00b2".encode()},  # isdigit(), yet not a number
        {b"subject": b"svc", b"expires_at": b"2027-06-30T00:00:00"},
        {b"subject": b"\xff\xfe"},  # not UTF-8
        {b"subject": b"svc", b"scopes": b"ok \xff"},
    ],
)
async def test_redis_bad_entry_is_ignored(
    fields: dict[bytes, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    fake, clock = FakeRedis(), Clock()
    fake.hashes[f"meshkit:apikey:{DIGEST}"] = fields
    assert await redis_keys(fake, clock).lookup_digest(DIGEST) is None
    assert "API key in Redis ignored" in caplog.text


@pytest.mark.parametrize(("value", "revoked"), [(b"1", True), (b"true", True), (b"0", False), (b"", False)])
async def test_redis_revoked_field(value: bytes, revoked: bool) -> None:
    fake, clock = FakeRedis(), Clock()
    fake.hashes[f"meshkit:apikey:{DIGEST}"] = {b"subject": b"svc", b"revoked": value}
    found = await redis_keys(fake, clock).lookup_digest(DIGEST)
    assert found is not None and found.revoked is revoked
