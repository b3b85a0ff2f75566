"""Exact event schedules: a JSON scenario replayed against the World, reported as JSON.

A scenario is the smallest way to state a protocol case precisely (the seed bug, a deadlock, a minimal
failing program found by the fuzzer) and to keep it as a regression.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from epd_receiver.adapters.kit.replicas import ReplicaWorld
from epd_receiver.adapters.kit.world import World
from epd_receiver.adapters.kit.world_config import WorldConfig
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.fsm import KVPoll, ReceiverQueue, ReceiverRequest, ReceiverSpec

Bench = Any  # a World, or a ReplicaWorld of several ranks: the same vocabulary


class ScenarioError(ValueError):
    """The scenario file itself is malformed (not a protocol failure)."""


def _arrive(world: Bench, request: Mapping[str, Any]) -> None:
    try:
        room, total = int(request["room"]), int(request["total_tokens"])
    except (KeyError, TypeError, ValueError) as error:
        raise ScenarioError(f"a request needs integer 'room' and 'total_tokens': {request!r}") from error
    if room in world.outcomes:
        raise ScenarioError(f"room {room} arrives twice")
    delta = request.get("mrope_delta")
    world.arrive(
        room,
        total,
        None if delta is None else int(delta),
        progress=bool(request.get("progress", False)),
        warmup=bool(request.get("warmup", False)),
        checksum=bool(request.get("checksum", False)),
    )


def _room_and(argument: Any, key: str) -> tuple[int, Any]:
    """An event argument is a room, or an object with a room and one more field."""
    if isinstance(argument, dict):
        return int(argument["room"]), argument.get(key)
    return int(argument), None


def _on_ranks(argument: Any) -> dict[str, Any]:
    """With simulated ranks, an event may reach only some of them: ``"ranks": [0]``."""
    if isinstance(argument, dict) and argument.get("ranks") is not None:
        return {"ranks": [int(r) for r in argument["ranks"]]}
    return {}


def _deliver(world: Bench, argument: Any) -> None:
    room, blocks = _room_and(argument, "blocks")
    world.deliver(room, None if blocks is None else int(blocks), **_on_ranks(argument))


def _late(world: Bench, argument: Any) -> None:
    room, status = _room_and(argument, "status")
    world.late_status(room, None if status is None else KVPoll(int(status)), **_on_ranks(argument))


def _advance(world: Bench, argument: Any) -> None:
    seconds = argument["seconds"] if isinstance(argument, dict) else argument
    world.advance(float(seconds), **_on_ranks(argument))


def _corrupt(world: Bench, argument: Any) -> None:
    field = argument.get("field", "total_tokens")
    if field == "total_tokens":
        world.corrupt_aux(int(argument["room"]), int(argument["value"]), **_on_ranks(argument))
    elif field == "embeddings":
        world.corrupt_data(int(argument["room"]), **_on_ranks(argument))
    else:
        raise ScenarioError(f"corrupt: the field is 'total_tokens' or 'embeddings', not {field!r}")


def _misreport(world: Bench, argument: Any) -> None:
    room = int(argument["room"])
    if "landed" in argument:
        world.misreport_landed(room, int(argument["landed"]), **_on_ranks(argument))
    else:
        world.misreport(room, int(argument["status"]), **_on_ranks(argument))


def _per_rank(method: str) -> Callable[[Bench, Any], object]:
    """An event naming a room, or a room and the ranks it reaches."""

    def apply(world: Bench, argument: Any) -> object:
        room, _ = _room_and(argument, "room")
        return getattr(world, method)(room, **_on_ranks(argument))

    return apply


EVENTS: dict[str, Callable[[Bench, Any], object]] = {
    "step": lambda world, count: world.step(int(count)),
    "deliver": _deliver,
    "fail": _per_rank("fail"),
    "abort": lambda world, room: world.abort(int(room)),
    "release": lambda world, room: world.release(int(room)),
    "late": _late,
    "corrupt": _corrupt,
    "drain": lambda world, patience: world.drain(int(patience or 3)),
    "advance": _advance,
    "kill": _per_rank("kill"),
    "stop": _per_rank("stop"),
    "misreport": _misreport,
    "break": lambda world, arg: world.break_link(int(arg["room"]), str(arg["call"]), **_on_ranks(arg)),
    "backwards": lambda world, room: world.go_backwards(int(room)),
    "arrive": _arrive,
}


ROOM_EVENTS = frozenset(
    {"deliver", "fail", "abort", "release", "late", "corrupt", "kill", "stop", "backwards", "misreport", "break"}
)


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
    queue_class: type[ReceiverQueue[EmbeddingPayload]] = ReceiverQueue,
    rig: Callable[[Any], object] | None = None,
) -> dict[str, Any]:
    """Replay on one rank, or on ``"ranks": N`` simulated ranks; ``rig`` changes the bench (a sender bug)."""
    try:
        config = WorldConfig.from_json(scenario["config"])
        options: dict[str, Any] = {
            "seed": int(scenario.get("seed", 0)),
            "bank_rows": int(scenario.get("bank_rows", 257)),
            "spec": spec,
            "request_class": request_class,
            "queue_class": queue_class,
        }
        ranks = int(scenario.get("ranks", 1))
        world: Bench = World(config, **options) if ranks == 1 else ReplicaWorld(config, ranks, **options)
        if rig is not None:
            rig(world)
        for request in scenario.get("requests", []):
            _arrive(world, request)
    except (KeyError, TypeError, ValueError) as error:
        raise ScenarioError(f"bad config or requests: {error}") from error
    for index, event in enumerate(scenario.get("events", [])):
        if not isinstance(event, dict) or len(event) != 1 or next(iter(event)) not in EVENTS:
            raise ScenarioError(f"event {index}: expected one of {sorted(EVENTS)}, got {event!r}")
        ((name, argument),) = event.items()
        room = argument.get("room") if isinstance(argument, dict) else argument
        if name in ROOM_EVENTS and _room(room) not in world.outcomes:
            raise ScenarioError(f"event {index} {event!r}: no request has room {argument!r}")
        try:
            EVENTS[name](world, argument)
        except (KeyError, TypeError, ValueError) as error:
            raise ScenarioError(f"event {index} {event!r}: {error}") from error
        world.checkpoint()
    return world.report()


def _room(argument: Any) -> int | None:
    try:
        return int(argument)
    except (TypeError, ValueError):
        return None
