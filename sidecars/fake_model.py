"""What `meshkit dev-upstream` answers: deterministic vectors, token counts, a canned chat answer.

Pure functions, so a test (or a cache in front) can compute the exact answer it expects.

`vector(model, dimensions, item)`: SHA-256 of the JSON array `[model, dimensions, item]` (a string
item stays a JSON string, a token array a JSON array of ints, so `"1"` and `[1]` differ) is the seed;
SHA-256 of `seed || counter` (counter a 4-byte big-endian int) in counter mode gives 32-bit words, each
mapped to [-1, 1); the vector is normalised to unit length and every component rounded to float32.
Because the components are float32 values, the `float` answer (JSON numbers) and the `base64` answer
(float32 bytes) carry exactly the same numbers.

`count_tokens(item)`: whitespace-separated words of a string, the length of a token array.

`chat_answer(text)`: "You said:" and the first `ANSWER_WORDS` words of the last user message (or
"Hello from meshkit dev-upstream." when there is none), cut into tokens: one word per token, each
after the first with its leading space, so joining the stream's deltas gives the answer.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct

from meshkit.sidecars.openai_shapes import Item

ANSWER_WORDS = 12
_WORDS_PER_DIGEST = 8  # 32 bytes of SHA-256 = 8 words of 32 bits


def item_seed(model: str, dimensions: int, item: Item) -> bytes:
    key = [model, dimensions, item if isinstance(item, str) else list(item)]
    return hashlib.sha256(json.dumps(key, separators=(",", ":"), ensure_ascii=False).encode()).digest()


def vector(model: str, dimensions: int, item: Item) -> list[float]:
    """A unit-length vector of `dimensions` float32 components, a function of its three arguments."""
    seed = item_seed(model, dimensions, item)
    raw: list[float] = []
    for counter in range(-(-dimensions // _WORDS_PER_DIGEST)):
        digest = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        raw.extend(word / 2**31 - 1.0 for word in struct.unpack(">8I", digest))
    del raw[dimensions:]
    norm = math.sqrt(math.fsum(x * x for x in raw)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(x / norm for x in raw))
    return list(struct.unpack(f"<{dimensions}f", packed))


def count_tokens(item: Item) -> int:
    return len(item.split()) if isinstance(item, str) else len(item)


def chat_answer(last_user_text: str) -> list[str]:
    """The answer's tokens; `"".join(tokens)` is the answer."""
    words = last_user_text.split()[:ANSWER_WORDS]
    text = ["You", "said:", *words] if words else ["Hello", "from", "meshkit", "dev-upstream."]
    return [word if i == 0 else f" {word}" for i, word in enumerate(text)]
