"""One rank's share of a distributed run, inside its own process: admit, step, verify, release.

The rank runs the unchanged controller over its own pool and transfer engine. Decisions it takes on its
own clock (when to stop, when fences have waited long enough) are taken together with the other ranks,
by a reduce; every payload is verified bit for bit against the source the rank regenerates itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from epd_receiver.adapters.kit.world_config import WorldConfig
from epd_receiver.adapters.ports.allocator import OwningBlockAllocator
from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.mooncake.link import Engine, Geometry, MooncakeReceiver, SenderUnreachable
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.adapters.ports.ranks import RankContext
from epd_receiver.adapters.tools.encode.control import EncodeControl
from epd_receiver.adapters.tools.encode.write import regenerate, source_generator
from epd_receiver.fsm import ReceiverQueue, State
from epd_receiver.fsm.request import ReceiverRequest

RAW_SCRATCH_BYTES = 64 << 20  # where the raw writes that mirror each chunk land, in pieces of this size


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of the plan, as the router would hand it to both sides."""

    room: int
    total_tokens: int
    progress: bool = False
    fault: str | None = None  # FAIL_ON_RESUME, TRANSFER_ERROR_ON_RESUME: what the Encode side will do
    abort: bool = False  # the client aborts it while it transfers


@dataclass(frozen=True, slots=True)
class RankRun:
    """What one rank job needs; plain data, so that it crosses into the rank processes by value."""

    bootstrap: str  # host:port of the bootstrap server
    control: str  # the Encode process's control socket (stats and the raw bench, from rank 0)
    config: WorldConfig
    arrivals: tuple[Arrival, ...]
    seed: int
    arrivals_per_step: int = 4
    checksum: bool = False
    wall_limit_s: float = 600.0
    settle_s: float = 5.0  # after the last request ends, how long fenced blocks may wait for acks
    bench: bool = True


@dataclass(slots=True)
class _Tally:
    outcomes: dict[int, dict[str, Any]] = field(default_factory=dict)
    tokens: int = 0
    iterations: int = 0


def run_rank(context: RankContext, run: RankRun) -> dict[str, Any]:
    """One rank's share of the workload: admit, step, verify, release; the outcome as plain data."""
    engine: Engine = context.cache.get("engine") or context.cache.setdefault("engine", Engine())
    c = run.config
    buffers = TorchBlockBuffers(c.num_blocks, c.block_size, c.hidden_size, c.deepstack)
    allocator = OwningBlockAllocator(c.num_blocks, c.block_size)
    receiver = MooncakeReceiver(engine, buffers, run.bootstrap, context.rank, tp_size=context.world_size)
    control = EncodeControl(run.control)
    try:
        queue: ReceiverQueue[EmbeddingPayload] = ReceiverQueue(
            buffers, allocator, c.receiver_config(), ranks=context.group
        )
        progress = _agree(context, receiver.connect())  # every rank makes the same kind of link
        if context.rank == 0 and run.bench:
            control.raw_target(engine.session, _raw_scratch(context, engine))
        before = control.stats(30.0) if context.rank == 0 else {}
        tally, seconds = _drive(context, run, receiver, queue, progress)
        _barrier(context)  # every rank has stopped stepping: no write is under way for this run any more
        transfer = _transfer_report(control, engine.session, before, run) if context.rank == 0 else {}
        _barrier(context)
        return {
            "rank": context.rank,
            "outcomes": tally.outcomes,
            "tokens": tally.tokens,
            "iterations": tally.iterations,
            "seconds": seconds,
            "owned_blocks": allocator.owned_count,
            "fenced_blocks": allocator.fenced_count,
            "fenced_rooms": sorted(queue.fenced_rooms),
            "collectives": context.group.collectives,
            "transfer": transfer,
            "extension": progress,
            "dropped": dict(receiver.dropped),
        }
    finally:
        control.close()
        receiver.close()


def _drive(
    context: RankContext,
    run: RankRun,
    receiver: MooncakeReceiver,
    queue: ReceiverQueue[EmbeddingPayload],
    progress: bool,
) -> tuple[_Tally, float]:
    generator = source_generator(run.seed, Geometry.of(receiver.buffers))
    by_room = {a.room: a for a in run.arrivals}
    pending = iter(run.arrivals)
    admitted, tally = 0, _Tally()
    started = time.monotonic()
    settle_until: float | None = None
    while True:
        for arrival in _take(pending, run.arrivals_per_step):
            queue.add(arrival.room, receiver.link(arrival.room, progress=progress and arrival.progress))
            admitted += 1
        if admitted == len(run.arrivals) and not len(queue):
            settle_until = settle_until or time.monotonic() + run.settle_s
            if not queue.fenced_rooms or not _agree(context, time.monotonic() < settle_until):
                break
        if tally.iterations % 64 == 0 and not _agree(context, time.monotonic() - started < run.wall_limit_s):
            break
        for request in [r for r in queue if r.state is State.TRANSFERRING and by_room[r.room].abort]:
            queue.abort(request.room)
        if not receiver.pump():
            receiver.wait(0.001)  # nothing new: give the Encode side the core instead of spinning
        for request in queue.step():
            _finish(request, by_room[request.room], generator, run, tally)
            if request.state is State.SUCCESS:
                queue.release(request.room)
        tally.iterations += 1
    for request in queue:
        if request.room not in tally.outcomes:
            tally.outcomes[request.room] = _outcome(request, verified=False)
    return tally, time.monotonic() - started


def _finish(
    request: ReceiverRequest[EmbeddingPayload], arrival: Arrival, generator: Any, run: RankRun, tally: _Tally
) -> None:
    verified = False
    if request.state is State.SUCCESS and request.payload is not None:
        source = regenerate(generator, arrival.room, arrival.total_tokens, checksum=run.checksum)
        wrong = source.mismatches(request.payload)
        verified = not wrong
        tally.tokens += request.payload.total_tokens
        tally.outcomes[arrival.room] = _outcome(request, verified, wrong)
    else:
        tally.outcomes[arrival.room] = _outcome(request, verified=False)


def _outcome(
    request: ReceiverRequest[EmbeddingPayload], verified: bool, wrong: list[str] | None = None
) -> dict[str, Any]:
    error = request.error
    return {
        "state": request.state.name,
        "cause": None if error is None else error.cause,
        "error": None if error is None else str(error),
        "verified": verified,
        "mismatches": wrong or [],
        "resumes": request.resumes,
        "reads": request.reads,
        "total_tokens": request.total_tokens,
    }


def _take(pending: Iterator[Arrival], n: int) -> list[Arrival]:
    return [a for _, a in zip(range(n), pending, strict=False)]


def _agree(context: RankContext, local: bool) -> bool:
    """True only when every rank says so: decisions taken on a local clock must be taken together."""
    return bool(context.group.min_reduce([], [int(local)])[0])


def _barrier(context: RankContext) -> None:
    context.group.min_reduce([], [])


def _raw_scratch(context: RankContext, engine: Engine) -> torch.Tensor:
    """Registered memory beside the pool for the raw writes that mirror each chunk; one per process and kept
    for its life, so that no write still landing can meet memory given back."""
    scratch = context.cache.get("raw_scratch")
    if scratch is None:
        scratch = context.cache["raw_scratch"] = torch.empty(RAW_SCRATCH_BYTES, dtype=torch.uint8)
        engine.register([scratch])
    return scratch


def _transfer_report(control: EncodeControl, session: str, before: dict[str, Any], run: RankRun) -> dict[str, Any]:
    """The Encode side's write time for this run, beside raw engine writes of the same bytes into rank 0: those
    that mirrored each chunk during the run, and one more pass once the workload is over."""
    try:
        after = control.stats(5.0)
    except SenderUnreachable as gone:
        return {"unavailable": str(gone)}
    moved = after["bytes"] - before["bytes"]
    busy = after["seconds"] - before["seconds"]
    report: dict[str, Any] = {
        "bytes": moved,
        "write_seconds": round(busy, 4),
        "chunks": after["chunks"] - before["chunks"],
        "entries": after["entries"] - before["entries"],
        "failed_writes": after["failed_writes"] - before["failed_writes"],
        "gb_per_s": _rate(moved, busy),
        "encode_dropped": after["dropped"],
    }
    if run.bench and after["raw_seconds"] > before["raw_seconds"]:  # the same run, under the same load
        raw_bytes = after["raw_bytes"] - before["raw_bytes"]
        raw_seconds = after["raw_seconds"] - before["raw_seconds"]
        report |= {
            "raw_bytes": raw_bytes,
            "raw_seconds": round(raw_seconds, 4),
            "raw_gb_per_s": _rate(raw_bytes, raw_seconds),
        }
        if busy:
            report["write_vs_raw"] = round((moved / busy) / (raw_bytes / raw_seconds), 3)
    if run.bench and moved:  # and on the machine left idle once the workload is over
        idle = control.bench(session, moved)
        report |= {"idle_raw_gb_per_s": _rate(idle["bytes"], idle["seconds"]), "idle_raw_rc": idle["rc"]}
        if idle["seconds"] and busy:
            report["write_vs_idle_raw"] = round((moved / busy) / (idle["bytes"] / idle["seconds"]), 3)
    return report


def _rate(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3) if seconds else 0.0
