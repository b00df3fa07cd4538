"""The memory tier: an LRU bounded in bytes (vector + per-entry overhead), 0 = off."""

from __future__ import annotations

import pytest

from meshkit.sidecars.vector_memory import ENTRY_OVERHEAD, TEXT_OVERHEAD, VectorMemory, parse_memory_size

VECTOR = 6144  # 1536 float32


def _vec(tag: int) -> bytes:
    return bytes([tag % 256]) * VECTOR


def test_evicts_least_recently_used_by_bytes() -> None:
    memory = VectorMemory(3 * (VECTOR + ENTRY_OVERHEAD))
    for key in ("a", "b", "c"):
        assert memory.put(key, _vec(ord(key))) == 0
    assert memory.bytes == 3 * (VECTOR + ENTRY_OVERHEAD) and len(memory) == 3
    assert memory.get("a") == _vec(ord("a"))  # a is now the most recent: b goes first
    assert memory.put("d", _vec(4)) == 1
    assert "b" not in memory and {"a", "c", "d"} == {k for k in "acd" if k in memory}
    assert memory.evictions == 1
    assert memory.put("big", b"\0" * (2 * VECTOR)) == 2  # needs the room of two
    assert memory.bytes <= memory.limit and "big" in memory and len(memory) == 2


def test_replacing_a_key_is_charged_once() -> None:
    memory = VectorMemory(10 * (VECTOR + ENTRY_OVERHEAD))
    memory.put("a", _vec(1))
    memory.put("a", _vec(2))
    assert memory.bytes == VECTOR + ENTRY_OVERHEAD and memory.get("a") == _vec(2)


def test_off_and_too_big_keep_nothing() -> None:
    off = VectorMemory(0)
    assert off.put("a", _vec(1)) == 0 and off.get("a") is None and off.bytes == 0
    small = VectorMemory(VECTOR)  # less than one vector + overhead
    small.put("a", _vec(1))
    assert small.get("a") is None and len(small) == 0
    with pytest.raises(ValueError):
        VectorMemory(-1)


TEXT = 21000  # about what 1536 floats print as


def test_a_rendered_text_is_charged_and_lives_and_dies_with_its_vector() -> None:
    entry = VECTOR + ENTRY_OVERHEAD
    memory = VectorMemory(2 * entry + TEXT + TEXT_OVERHEAD)
    assert memory.put_text("a", b"[1]") == 0 and memory.get_text("a") is None  # no vector, no text
    memory.put("a", _vec(1))
    memory.put("b", _vec(2))
    assert memory.put_text("a", b"x" * TEXT) == 0
    assert memory.bytes == 2 * entry + TEXT + TEXT_OVERHEAD and memory.get_text("a") == b"x" * TEXT
    assert memory.put_text("b", b"y" * TEXT) == 1  # no room for two texts: the LRU entry (a) goes
    assert "a" not in memory and memory.get_text("a") is None
    assert memory.bytes == entry + TEXT + TEXT_OVERHEAD and memory.get_text("b") == b"y" * TEXT
    memory.put("b", _vec(3))  # a new vector: its old text is not its own
    assert memory.get_text("b") is None and memory.bytes == entry
    memory.put("c", _vec(4))
    memory.put_text("c", b"z" * TEXT)
    assert memory.put("d", _vec(5)) == 1  # b, the least recent, makes room
    assert "b" not in memory and memory.get_text("c") == b"z" * TEXT
    assert memory.put("e", _vec(6)) == 1  # c goes, and its text with it
    assert "c" not in memory and memory.get_text("c") is None
    assert memory.bytes == 2 * entry and len(memory) == 2


def test_a_text_that_cannot_fit_beside_its_vector_is_not_kept() -> None:
    memory = VectorMemory(VECTOR + ENTRY_OVERHEAD + 100)
    memory.put("a", _vec(1))
    assert memory.put_text("a", b"x" * TEXT) == 0
    assert memory.get_text("a") is None and "a" in memory
    off = VectorMemory(0)
    assert off.put_text("a", b"[1]") == 0 and off.get_text("a") is None


def test_parse_memory_size() -> None:
    assert parse_memory_size("0") == 0
    assert parse_memory_size("64MiB") == 64 << 20
    assert parse_memory_size(1024) == 1024
    for bad in ("-1", "lots"):
        with pytest.raises(ValueError, match="expected a size"):
            parse_memory_size(bad)
    with pytest.raises(ValueError, match="at most 1GiB") as caught:
        parse_memory_size("2GiB")
    assert "Envoy" not in str(caught.value)
