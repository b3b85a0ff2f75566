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

from epd_receiver.fsm import ReceiverRequest, ReceiverSpec

from .itf import Step, load_trace
from .payload import EmbeddingPayload
from .world import World, WorldConfig

ACTIONS: dict[str, Callable[[World, dict[str, Any]], object]] = {
    "arrive": lambda world, picks: world.arrive(picks["room"], picks["total"]),
    "schedulerStep": lambda world, picks: world.step(),
    "deliver": lambda world, picks: world.deliver(picks["room"]),
    "senderFail": lambda world, picks: world.fail(picks["room"]),
    "abort": lambda world, picks: world.abort(picks["room"]),
    "release": lambda world, picks: world.release(picks["room"]),
    "corrupt": lambda world, picks: world.corrupt_aux(picks["room"], picks["value"]),
}


class Divergence(AssertionError):
    """The controller and the model disagree; the message names the trace and the first differing step."""


def model_config(model: Path) -> WorldConfig:
    """The pool the model is checked with, read from the bounds at the top of receiver.qnt."""
    text = model.read_text(encoding="utf-8")

    def bound(name: str) -> int:
        match = re.search(rf"pure val {name} = (\d+)", text)
        if match is None:
            raise ValueError(f"{model}: no `pure val {name} = <int>`")
        return int(match.group(1))

    return WorldConfig(
        block_size=bound("B"),
        num_blocks=bound("N"),
        default_alloc_tokens=bound("D"),
        hidden_size=4,
        max_total_tokens=bound("MAX_TOTAL"),
    )


def model_view(state: dict[str, Any], room: int) -> dict[str, Any]:
    r = state["w"]["req"][room]
    return {
        "state": r["state"],
        "blocks": [] if r["released"] else list(r["blocks"]),
        "total": None if r["total"] < 0 else r["total"],
        "landed": r["landed"],
    }


def differences(world: World, state: dict[str, Any]) -> list[str]:
    found = []
    model_free = list(state["w"]["free"])
    if list(world.allocator.free_list()) != model_free:
        found.append(f"free list: controller {list(world.allocator.free_list())}, model {model_free}")
    for room in sorted(state["w"]["req"]):
        ours, theirs = world.request_view(room), model_view(state, room)
        if ours != theirs:
            found.append(f"room {room}: controller {ours}, model {theirs}")
    found += [f"judge: {v}" for v in world.check()]
    return found


def replay_trace(
    steps: list[Step],
    config: WorldConfig,
    *,
    name: str = "trace",
    spec: ReceiverSpec | None = None,
    request_class: type[ReceiverRequest[EmbeddingPayload]] = ReceiverRequest,
) -> None:
    world = World(config, bank_rows=31, spec=spec, request_class=request_class)
    for index, step in enumerate(steps):
        if index > 0:
            ACTIONS[step.action](world, step.picks)
        found = differences(world, step.state)
        if found:
            raise Divergence(_describe(name, steps, index, found))


def replay_file(path: Path, config: WorldConfig, **options: Any) -> None:
    replay_trace(load_trace(path), config, name=path.name, **options)


def _describe(name: str, steps: list[Step], index: int, found: list[str]) -> str:
    lines = [f"{name}: controller and model disagree after step {index} ({steps[index].action})"]
    for i, step in enumerate(steps[: index + 1]):
        picks = ", ".join(f"{k}={v}" for k, v in sorted(step.picks.items()))
        lines.append(f"  {'>' if i == index else ' '} {i:3} {step.action}({picks})")
    lines += [f"    {difference}" for difference in found]
    return "\n".join(lines)
