"""Generated JSON schemas (nested objects, arrays, enums, bounded numbers, required fields), seeded."""

from __future__ import annotations

import random
from typing import Any

WORDS = ["name", "city", "age", "score", "tags", "kind", "owner", "items", "count", "level", "price", "id"]


def _leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["string", "integer", "number", "enum", "boolean"])
    if kind == "string":
        return {"type": "string", "minLength": 1, "maxLength": rng.choice([8, 12, 16])}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(1, 500)}
    if kind == "number":  # an integer-valued bound: an unbounded fraction could run to max_tokens
        return {"type": "number", "minimum": -1000, "maximum": rng.choice([1, 10, 1000]), "multipleOf": 1}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "small", "large", "yes", "no"], rng.randint(2, 4))}
    return {"type": "boolean"}


def _value(rng: random.Random, depth: int) -> dict[str, Any]:
    roll = rng.random()
    if depth < 2 and roll < 0.25:
        return make_object(rng, depth + 1)
    if roll < 0.45:
        return {"type": "array", "items": _leaf(rng), "minItems": 1, "maxItems": rng.randint(1, 3)}
    return _leaf(rng)


def make_object(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    keys = rng.sample(WORDS, rng.randint(1, 3 if depth else 4))
    props = {k: _value(rng, depth) for k in keys}
    required = [k for k in keys if rng.random() < 0.7] or keys[:1]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def generated_schemas(count: int = 20, seed: int = 17) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [make_object(rng) for _ in range(count)]
