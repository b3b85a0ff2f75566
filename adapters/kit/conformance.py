"""Replay traces of the Quint model (spec/receiver.qnt) through the real controller, step by step.

The model and the code are two descriptions of one protocol; this is where they must agree. Each ITF
trace names the action taken at every step and its nondeterministic picks; the same action is applied
to a World (real controller, torch buffers, allocator, in-process sender), and after every step the
controller states, the blocks each request holds, the cached totals, the allocator's free list (in
order) and the judge's verdict must match the model's state.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from epd_receiver.adapters.kit.itf import Step, load_trace
from epd_receiver.adapters.kit.world import World
from epd_receiver.adapters.kit.world_config import WorldConfig
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.fsm import KVPoll, ReceiverRequest, ReceiverSpec

# One tick of the model's clock is one second of the World's ManualClock.
TICK_S = 1.0

ACTIONS: dict[str, Callable[[World, dict[str, Any]], object]] = {
    "arrive": lambda world, picks: world.arrive(
        picks["room"], picks["total"], progress=picks["progress"], checksum=picks["checksum"]
    ),
    "arriveWarmup": lambda world, picks: world.arrive(picks["room"], 1, warmup=True),
    "schedulerStep": lambda world, picks: world.step(),
    "deliver": lambda world, picks: world.deliver(picks["room"]),
    "senderFail": lambda world, picks: world.fail(picks["room"]),
    "abort": lambda world, picks: world.abort(picks["room"]),
    "release": lambda world, picks: world.release(picks["room"]),
    "corrupt": lambda world, picks: world.corrupt_aux(picks["room"], picks["value"]),
    "corruptData": lambda world, picks: world.corrupt_data(picks["room"]),
    "advance": lambda world, picks: world.advance(TICK_S),
    "stop": lambda world, picks: world.stop(picks["room"]),
}

# The World's methods for these answer whether they could do what was asked; the model only takes an
# action whose precondition holds, so a refusal is already a disagreement (and would hide later ones).
MUST_APPLY = frozenset({"deliver", "abort", "release", "corrupt", "corruptData", "stop"})

# The model's deadline bounds (ticks, -1 for none) and the ReceiverConfig field each one sets.
TIMEOUTS = {
    "BOOTSTRAP_TIMEOUT": "bootstrap_timeout_s",
    "ADMISSION_TIMEOUT": "admission_timeout_s",
    "TRANSFER_TIMEOUT": "transfer_timeout_s",
    "BLOCKS_TIMEOUT": "blocks_timeout_s",
    "RESUME_TIMEOUT": "resume_timeout_s",
    "DRAIN_TIMEOUT": "drain_timeout_s",
}


class Divergence(AssertionError):
    """The controller and the model disagree; the message names the trace and the first differing step."""


def model_config(model: Path) -> WorldConfig:
    """The pool the model is checked with, read from the bounds at the top of receiver.qnt."""
    text = model.read_text(encoding="utf-8")

    def bound(name: str) -> int:
        match = re.search(rf"pure val {name} = (-?\d+)", text)
        if match is None:
            raise ValueError(f"{model}: no `pure val {name} = <int>`")
        return int(match.group(1))

    # The model fails a request that has spent more than k whole ticks in a state; a deadline of k + 1/2
    # ticks trips at the same tick under the controller's strict comparison, and is positive for k = 0,
    # which ReceiverConfig requires.
    timeouts: dict[str, float | None] = {
        field: None if bound(name) < 0 else (bound(name) + 0.5) * TICK_S for name, field in TIMEOUTS.items()
    }
    return WorldConfig(
        block_size=bound("B"),
        num_blocks=bound("N"),
        default_alloc_tokens=bound("D"),
        hidden_size=4,
        max_total_tokens=bound("MAX_TOTAL"),
        timeouts=timeouts,
        # The model's sender acts on an abort only at its own `stop` step, so it may land a chunk first.
        async_abort=True,
    )


def model_view(state: dict[str, Any], room: int) -> dict[str, Any]:
    r = state["w"]["req"][room]
    return {
        "state": r["state"],
        "blocks": [] if r["released"] else list(r["blocks"]),
        "total": None if r["total"] < 0 else r["total"],
        "landed": r["landed"],
        "cause": r["cause"] or None,
        "fenced": list(r["fenced"]),
    }


def controller_view(world: World, room: int, causes: dict[int, str | None]) -> dict[str, Any]:
    """The World's view of a request plus the cause of its typed error: the model names why it failed."""
    request = world.queue.get(room)
    if request is None:
        return world.request_view(room) | {"cause": causes.get(room), "fenced": []}
    cause = request.error.cause if request.error is not None else None
    return world.request_view(room) | {"cause": cause, "fenced": list(request.fenced)}


def differences(world: World, state: dict[str, Any], causes: dict[int, str | None] | None = None) -> list[str]:
    found = []
    model_free = list(state["w"]["free"])
    if list(world.allocator.free_list()) != model_free:
        found.append(f"free list: controller {list(world.allocator.free_list())}, model {model_free}")
    for room in sorted(state["w"]["req"]):
        ours, theirs = controller_view(world, room, causes or {}), model_view(state, room)
        if ours != theirs:
            found.append(f"room {room}: controller {ours}, model {theirs}")
    if list(world.queue.fenced_rooms) != list(state["w"]["fencedQ"]):
        found.append(f"fenced rooms: controller {list(world.queue.fenced_rooms)}, model {state['w']['fencedQ']}")
    if world.clock.now() != state["w"]["now"] * TICK_S:
        found.append(f"clock: controller {world.clock.now()}, model {state['w']['now']} ticks")
    found += [f"judge: {v}" for v in world.check()]
    return found


def replay_trace(
    steps: list[Step],
    config: WorldConfig,
    *,
    name: str = "trace",
    spec: ReceiverSpec | None = None,
    request_class: type[ReceiverRequest[EmbeddingPayload]] = ReceiverRequest,
) -> list[Step]:
    world = World(config, bank_rows=31, spec=spec, request_class=request_class)
    causes: dict[int, str | None] = {}  # requests that left the queue take their error with them
    for index, step in enumerate(steps):
        found = []
        if index > 0:
            result = ACTIONS[step.action](world, step.picks)
            if step.action in MUST_APPLY and result is False:
                found.append(f"the World refused {step.action}({step.picks}), which the model took")
            if step.action == "schedulerStep":
                assert isinstance(result, list)
                causes.update({r.room: r.error.cause if r.error else None for r in result})
        found += differences(world, step.state, causes)
        if found:
            raise Divergence(_describe(name, steps, index, found))
    return steps


def replay_file(path: Path, config: WorldConfig, **options: Any) -> list[Step]:
    return replay_trace(load_trace(path), config, name=path.name, **options)


def behaviours(steps: list[Step]) -> set[str]:
    """What a trace exercised, read from the model's states: agreement on traces that never reach a
    behaviour says nothing about it, so the test asks that every one of these occurs somewhere."""
    seen: set[str] = set()
    before: dict[str, Any] | None = None
    for step in steps:
        w = step.state["w"]
        for room, r in w["req"].items():
            sender = w["snd"][room]
            if r["cause"]:
                seen.add(f"failed: {r['cause']}")
            if r["state"] == "SUCCESS":
                seen.add("warm-up succeeded" if sender["warmup"] else "succeeded")
                if sender["checksum"] and not sender["warmup"]:
                    seen.add("checksum verified")
            if sender["progress"] and r["resumes"] >= 2:
                seen.add("several rounds")
            if r["fenced"]:
                seen.add(f"fenced after {r['cause']}")
            if before is None or room not in before["req"]:
                continue
            was_fenced = bool(before["req"][room]["fenced"])
            if was_fenced and not r["fenced"]:
                if sender["status"] in (KVPoll.Failed, KVPoll.Success):
                    seen.add("fence lifted by a terminal status")
                else:
                    seen.add("fence lifted by an ack" if sender["stopped"] else "fence lifted by the drain deadline")
            if step.action == "deliver" and was_fenced and before["snd"][room]["pending"] != sender["pending"]:
                seen.add("chunk landed in a fence")
        before = w
    return seen


def _describe(name: str, steps: list[Step], index: int, found: list[str]) -> str:
    lines = [f"{name}: controller and model disagree after step {index} ({steps[index].action})"]
    for i, step in enumerate(steps[: index + 1]):
        picks = ", ".join(f"{k}={v}" for k, v in sorted(step.picks.items()))
        lines.append(f"  {'>' if i == index else ' '} {i:3} {step.action}({picks})")
    lines += [f"    {difference}" for difference in found]
    return "\n".join(lines)
