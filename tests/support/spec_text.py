"""The packaged spec as text to edit: a tiny TOML writer, enough for the spec's shape, and loaders of edited
or freshly parsed copies, for the tests that check what the loader refuses and what it builds."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

from epd_receiver.fsm.spec import ReceiverSpec, default_spec_text, load_spec


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def dump_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Scalars and plain arrays first, then sub-tables, then arrays of tables, each under its full header."""
    lines = [
        f"{key} = {_value(value)}"
        for key, value in data.items()
        if not isinstance(value, Mapping) and not _is_table_array(value)
    ]
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            lines += ["", f"[{name}]", dump_toml(value, name)]
        elif _is_table_array(value):
            for item in value:
                lines += ["", f"[[{name}]]", dump_toml(item, name)]
    return "\n".join(lines)


def default_raw() -> dict[str, Any]:
    return tomllib.loads(default_spec_text())


def load_edited(edit: Callable[[dict[str, Any]], None]) -> ReceiverSpec:
    """Parse the packaged spec, apply ``edit`` to the raw tables, write it back and load the result."""
    raw = default_raw()
    edit(raw)
    return load_spec(dump_toml(raw))


def fresh_spec() -> ReceiverSpec:
    """The packaged text parsed anew, not the cached spec every queue shares."""
    return load_spec(default_spec_text())
