"""The answer writer: valid JSON in OpenAI's shape, floats that read back as the stored float32."""

from __future__ import annotations

import base64
import json
import math
import random
import struct

from meshkit.sidecars.embedding_answer import embeddings_answer


def _vectors() -> list[bytes]:
    rng = random.Random(7)
    special = [0.0, -0.0, 1.0, -1.0, 1e-38, 3.4028234e38, 1.4e-45, 0.1, 123456.78]
    values = [special, [rng.uniform(-1, 1) for _ in range(1536)], [rng.gauss(0, 1e-6) for _ in range(64)]]
    return [struct.pack(f"<{len(v)}f", *v) for v in values]


def test_float_answer_reads_back_as_the_stored_float32_bit_for_bit() -> None:
    vectors = _vectors()
    doc = json.loads(embeddings_answer(vectors, "float", 'a "quoted" model', 3, 4))
    assert doc["object"] == "list" and doc["model"] == 'a "quoted" model'
    assert doc["usage"] == {"prompt_tokens": 3, "total_tokens": 4}
    assert [d["index"] for d in doc["data"]] == [0, 1, 2]
    for entry, raw in zip(doc["data"], vectors, strict=True):
        assert entry["object"] == "embedding"
        floats = entry["embedding"]
        assert struct.pack(f"<{len(floats)}f", *floats) == raw


def test_base64_answer_is_the_bytes() -> None:
    vectors = _vectors()
    doc = json.loads(embeddings_answer(vectors, "base64", "m", 0, 0))
    assert [base64.b64decode(d["embedding"]) for d in doc["data"]] == vectors


def test_a_non_finite_component_falls_back_to_json_dumps() -> None:
    raw = struct.pack("<3f", 1.0, math.inf, math.nan)
    text = embeddings_answer([raw], "float", "m", 0, 0).decode()
    assert "[1.0, Infinity, NaN]" in text  # what json.dumps writes (as Python's json reads back)
    assert json.loads(text)["data"][0]["embedding"][0] == 1.0


def test_negative_zero_keeps_its_sign_wherever_it_is() -> None:
    for values in ([-0.0], [-0.0, 1.0], [1.0, -0.0], [1.0, -0.0, 2.0], [-0.0, -0.0, 1e-5]):
        raw = struct.pack(f"<{len(values)}f", *values)
        floats = json.loads(embeddings_answer([raw], "float", "m", 0, 0))["data"][0]["embedding"]
        assert struct.pack(f"<{len(floats)}f", *floats) == raw, floats
