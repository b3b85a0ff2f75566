"""Exact event schedules: a JSON scenario replayed against the World, reported as JSON.

A scenario is the smallest way to state a protocol case precisely (the seed bug, a deadlock, a minimal
failing program found by the fuzzer) and to keep it as a regression.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from epd_receiver.fsm import ReceiverRequest, ReceiverSpec

from .payload import EmbeddingPayload
from .world import World, WorldConfig


class ScenarioError(ValueError):
    """The scenario file itself is malformed (not a protocol failure)."""


def _arrive(world: World, request: Mapping[str, Any]) -> None:
    try:
        room, total = int(request["room"]), int(request["total_tokens"])
    except (KeyError, TypeError, ValueError) as error:
        raise ScenarioError(f"a request needs integer 'room' and 'total_tokens': {request!r}") from error
    if room in world.outcomes:
        raise ScenarioError(f"room {room} arrives twice")
    delta = request.get("mrope_delta")
    world.arrive(room, total, None if delta is None else int(delta))


EVENTS: dict[str, Callable[[World, Any], object]] = {
    "step": lambda world, count: world.step(int(count)),
    "deliver": lambda world, room: world.deliver(int(room)),
    "fail": lambda world, room: world.fail(int(room)),
    "abort": lambda world, room: world.abort(int(room)),
    "release": lambda world, room: world.release(int(room)),
    "late": lambda world, room: world.late_status(int(room)),
    "arrive": _arrive,
}


ROOM_EVENTS = frozenset({"deliver", "fail", "abort", "release", "late"})


def load_scenario(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ScenarioError(f"{path}: {error}") from error
    if not isinstance(data, dict) or "config" not in data:
        raise ScenarioError(f"{path}: a scenario is an object with 'config', 'requests' and 'events'")
    return data


def replay(
    scenario: Mapping[str, Any],
    *,
    spec: ReceiverSpec | None = None,
    request_class: type[ReceiverRequest[EmbeddingPayload]] = ReceiverRequest,
) -> dict[str, Any]:
    try:
        config = WorldConfig.from_json(scenario["config"])
        world = World(config, seed=int(scenario.get("seed", 0)), bank_rows=257, spec=spec, request_class=request_class)
        for request in scenario.get("requests", []):
            _arrive(world, request)
    except (KeyError, TypeError, ValueError) as error:
        raise ScenarioError(f"bad config or requests: {error}") from error
    for index, event in enumerate(scenario.get("events", [])):
        if not isinstance(event, dict) or len(event) != 1 or next(iter(event)) not in EVENTS:
            raise ScenarioError(f"event {index}: expected one of {sorted(EVENTS)}, got {event!r}")
        ((name, argument),) = event.items()
        if name in ROOM_EVENTS and _room(argument) not in world.outcomes:
            raise ScenarioError(f"event {index} {event!r}: no request has room {argument!r}")
        try:
            EVENTS[name](world, argument)
        except (KeyError, TypeError, ValueError) as error:
            raise ScenarioError(f"event {index} {event!r}: {error}") from error
    return world.report()


def _room(argument: Any) -> int | None:
    try:
        return int(argument)
    except (TypeError, ValueError):
        return None
