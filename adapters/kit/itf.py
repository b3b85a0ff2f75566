"""A small reader of the Informal Trace Format (ITF) that Quint writes with ``--out-itf``.

Values arrive tagged: ``{"#bigint": "5"}``, ``{"#map": [[k, v], ...]}``, ``{"#set": [...]}``,
``{"#tup": [...]}``, variants as ``{"tag": ..., "value": ...}``; records and lists are plain JSON.
(``itf-py`` does not parse Quint 0.33's variants, hence this.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Variant:
    tag: str
    value: Any


def decode(value: Any) -> Any:
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "#bigint" in value:
        return int(value["#bigint"])
    if "#map" in value:
        return {_key(decode(k)): decode(v) for k, v in value["#map"]}
    if "#set" in value:
        return frozenset(_key(decode(v)) for v in value["#set"])
    if "#tup" in value:
        return tuple(decode(v) for v in value["#tup"])
    if set(value) == {"tag", "value"}:
        return Variant(value["tag"], decode(value["value"]))
    return {k: decode(v) for k, v in value.items() if k != "#meta"}


def _key(value: Any) -> Any:
    """Map keys and set members must hash: lists become tuples."""
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True, slots=True)
class Step:
    action: str
    picks: dict[str, Any]
    state: dict[str, Any]


def load_trace(path: Path) -> list[Step]:
    """The states of one trace, each with the action that produced it and its nondeterministic picks."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    steps = []
    for state in raw["states"]:
        decoded = decode(state)
        picks = {
            name: pick.value
            for name, pick in decoded.pop("mbt::nondetPicks", {}).items()
            if isinstance(pick, Variant) and pick.tag == "Some"
        }
        steps.append(Step(decoded.pop("mbt::actionTaken", ""), picks, decoded))
    return steps
