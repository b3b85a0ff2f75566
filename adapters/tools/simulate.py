"""The end-to-end simulated transfer: a workload of EPD requests through one receiver queue.

Requests arrive a few per scheduler iteration with lengths drawn so that a good share exceed the
default allocation and must resume; the in-process sender lands chunks with random timing; every
successful payload is checked bit for bit against what the sender produced, then released.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from epd_receiver.adapters.kit.world import World
from epd_receiver.adapters.kit.world_config import WorldConfig
from epd_receiver.adapters.ports.payload import token_bytes
from epd_receiver.fsm import ReceiverMetrics, State


@dataclass(frozen=True, slots=True)
class Workload:
    requests: int = 200
    seed: int = 0
    arrivals_per_step: int = 4
    deliver_prob: float = 0.5
    resume_share: float = 0.35
    max_payload_factor: int = 3
    fail_rate: float = 0.0
    abort_rate: float = 0.0
    progress_share: float = 0.0  # requests whose sender reports progress, so they may resume in rounds
    max_iterations: int = 200_000


def draw_length(rng: random.Random, config: WorldConfig, workload: Workload) -> int:
    """Most prompts are short (log-uniform up to the default allocation, as text plus an image or two);
    a ``resume_share`` of them are up to ``max_payload_factor`` times larger and must resume."""
    d = config.default_alloc_tokens
    if rng.random() < workload.resume_share:
        return rng.randint(d + 1, d * workload.max_payload_factor)
    return min(d, max(1, round(math.exp(rng.uniform(math.log(16), math.log(d))))))


def simulate(
    config: WorldConfig,
    workload: Workload,
    progress: Callable[[int], None] | None = None,
    metrics: ReceiverMetrics | None = None,
) -> dict[str, Any]:
    rng = random.Random(workload.seed)
    world = World(config, seed=workload.seed, metrics=metrics)
    doomed = {room for room in range(workload.requests) if rng.random() < workload.fail_rate}
    abandoned = {room for room in range(workload.requests) if rng.random() < workload.abort_rate}
    next_room = iterations = tokens = 0
    started = time.perf_counter()
    while iterations < workload.max_iterations:
        for _ in range(workload.arrivals_per_step):
            if next_room < workload.requests:
                total = draw_length(rng, config, workload)
                world.arrive(next_room, total, progress=rng.random() < workload.progress_share)
                next_room += 1
        live = [r for r in world.queue if r.state not in (State.SUCCESS, State.FAILED)]
        if next_room == workload.requests and not live and not world.queue.fenced_rooms:
            break  # done, and no failed request still fences blocks its sender might write
        for request in live:
            if request.room in doomed and request.state is State.RESUMING:
                world.fail(request.room)
            elif request.room in abandoned and request.state is State.TRANSFERRING and rng.random() < 0.5:
                world.abort(request.room)
            elif rng.random() < workload.deliver_prob:
                world.deliver(request.room)
        for request in world.step():
            if request.state is State.SUCCESS:
                tokens += request.landed
                world.release(request.room)
            if progress is not None:
                progress(1)
        iterations += 1
    elapsed = time.perf_counter() - started
    return summarize(world, iterations, tokens, elapsed)


def summarize(world: World, iterations: int, tokens: int, elapsed: float) -> dict[str, Any]:
    outcomes = list(world.outcomes.values())
    succeeded = [o for o in outcomes if o.states[-1] is State.SUCCESS]
    failed = [o for o in outcomes if o.states[-1] is State.FAILED]
    ended = succeeded + failed
    row_bytes = token_bytes(world.config.hidden_size, world.config.deepstack)
    violations = world.check()
    if world.allocator.owned_count or world.allocator.fenced_count:
        violations.append(
            f"I5: {world.allocator.owned_count} blocks still owned, {world.allocator.fenced_count} fenced at the end"
        )
    return {
        "requests": len(outcomes),
        "succeeded": len(succeeded),
        "failed": len(failed),
        "unfinished": len(outcomes) - len(ended),
        "resumed": sum(1 for o in ended if o.resumes > 0),
        "resume_rounds": sum(o.resumes for o in ended),
        "verified": sum(1 for o in succeeded if o.verified),
        "mean_reads_per_request": round(sum(o.reads for o in ended) / max(1, len(ended)), 3),
        "max_reads_per_request": max((o.reads for o in ended), default=0),
        "leaked_blocks": world.allocator.owned_count,
        "fenced_blocks": world.allocator.fenced_count,
        "iterations": iterations,
        "tokens": tokens,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(ended) / elapsed, 1) if elapsed else 0.0,
        "payload_gb_per_s": round(tokens * row_bytes / elapsed / 1e9, 3) if elapsed else 0.0,
        "config": {
            "block_size": world.config.block_size,
            "num_blocks": world.config.num_blocks,
            "default_alloc_tokens": world.config.default_alloc_tokens,
            "hidden_size": world.config.hidden_size,
            "deepstack": world.config.deepstack,
        },
        "violations": violations,
    }
