"""The simulated workload across real processes: tensor-parallel ranks over gloo, the Encode side over Mooncake.

Every rank runs the unchanged controller over its own pool, registered with its own transfer engine, and
receives a full copy of every payload from the Encode process, over the SGLang fork's wire: the ranks find
the Encode process through a bootstrap server this driver runs, and the Encode process learns which rooms
exist (T, seed, injected faults) over its control socket, as a real one learns them from its scheduler.
The workload is a plan every rank derives from the same seed, so the ranks admit the same rooms in the
same iterations; the rest of their lockstep is the controller's (reduced polls and deadlines, agreed
totals, compared allocator fingerprints). Every rank verifies every payload bit for bit against the
source it regenerates from (seed, room, T), and the summary says what happened on each, with the frames
each side dropped.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from epd_receiver.adapters.kit.world import WorldConfig
from epd_receiver.adapters.ports.allocator import OwningBlockAllocator
from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.mooncake.bootstrap import BootstrapServer
from epd_receiver.adapters.ports.mooncake.link import Engine, Geometry, MooncakeReceiver, SenderUnreachable
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.adapters.ports.ranks import RankContext, RankProcesses
from epd_receiver.adapters.tools.encode.control import EncodeControl, EncodeProcess
from epd_receiver.adapters.tools.encode.desk import FAIL_ON_RESUME, RoomPlan
from epd_receiver.adapters.tools.encode.write import regenerate, source_generator
from epd_receiver.adapters.tools.simulate import Workload, draw_length
from epd_receiver.fsm import ReceiverQueue, State
from epd_receiver.fsm.request import ReceiverRequest

BYTES_PER_POSITION = 4 + 12  # an int32 id and three int32 M-RoPE positions per token


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of the plan, as the router would hand it to both sides."""

    room: int
    total_tokens: int
    progress: bool = False
    fault: str | None = None  # FAIL_ON_RESUME, TRANSFER_ERROR_ON_RESUME: what the Encode side will do
    abort: bool = False  # the client aborts it while it transfers


def plan(config: WorldConfig, workload: Workload) -> list[Arrival]:
    """The workload's requests, drawn from its seed alone, so that every process derives the same plan."""
    rng = random.Random(workload.seed)
    arrivals = []
    for room in range(workload.requests):
        total = draw_length(rng, config, workload)
        progress = rng.random() < workload.progress_share
        fault = FAIL_ON_RESUME if rng.random() < workload.fail_rate else None
        arrivals.append(Arrival(room, total, progress, fault, abort=rng.random() < workload.abort_rate))
    return arrivals


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


# ---- inside one rank process ------------------------------------------------------------------------


@dataclass(slots=True)
class _Tally:
    outcomes: dict[int, dict[str, Any]] = field(default_factory=dict)
    tokens: int = 0
    iterations: int = 0


def run_rank(context: RankContext, run: RankRun) -> dict[str, Any]:
    """One rank's share of the workload: admit, step, verify, release; the outcome as plain data."""
    engine: Engine = context.cache.setdefault("engine", Engine())
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


def _transfer_report(control: EncodeControl, session: str, before: dict[str, Any], run: RankRun) -> dict[str, Any]:
    """The Encode side's write time for this run, and a raw engine write of the same bytes (rank 0's pool)."""
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
        "gb_per_s": round(moved / busy / 1e9, 3) if busy else 0.0,
        "encode_dropped": after["dropped"],
    }
    if run.bench and moved:
        raw = control.bench(session, moved)
        report |= {
            "raw_bytes": raw["bytes"],
            "raw_seconds": round(raw["seconds"], 4),
            "raw_gb_per_s": round(raw["bytes"] / raw["seconds"] / 1e9, 3) if raw["seconds"] else 0.0,
            "raw_rc": raw["rc"],
        }
    return report


# ---- the driver -------------------------------------------------------------------------------------


class Cluster:
    """The Encode process and the rank processes, started once and reused for one workload after another."""

    def __init__(self, ranks: int) -> None:
        self.bootstrap = BootstrapServer()
        try:
            self.encode = EncodeProcess(self.bootstrap.address)
            self.ranks = RankProcesses(ranks)
        except BaseException:
            self.close()
            raise

    def ensure_encode(self) -> EncodeProcess:
        """A fresh Encode process when the last one died (a fault test kills it); it registers anew."""
        if not self.encode.alive:
            self.encode.kill()
            self.encode = EncodeProcess(self.bootstrap.address, self.encode.endpoint)
        return self.encode

    def run(
        self,
        config: WorldConfig,
        workload: Workload,
        arrivals: list[Arrival] | None = None,
        *,
        checksum: bool = False,
        settle_s: float = 5.0,
        bench: bool = True,
    ) -> dict[str, Any]:
        arrivals = plan(config, workload) if arrivals is None else arrivals
        encode = self.ensure_encode()
        geometry = Geometry(config.num_blocks, config.block_size, config.hidden_size, config.deepstack)
        plans = [RoomPlan(a.room, a.total_tokens, workload.seed, checksum, a.fault) for a in arrivals]
        encode.control.begin(geometry, plans)
        job = RankRun(
            self.bootstrap.address,
            encode.endpoint,
            config,
            tuple(arrivals),
            workload.seed,
            workload.arrivals_per_step,
            checksum,
            settle_s=settle_s,
            bench=bench,
        )
        started = time.perf_counter()
        results = self.ranks.run(run_rank, job, timeout_s=job.wall_limit_s + 120)
        return summarize(config, arrivals, results, time.perf_counter() - started)

    def close(self) -> None:
        if hasattr(self, "ranks"):
            self.ranks.close()
        if hasattr(self, "encode"):
            self.encode.stop()
        self.bootstrap.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def simulate_distributed(
    config: WorldConfig, workload: Workload, ranks: int, *, checksum: bool = False
) -> dict[str, Any]:
    """``epd-receiver simulate --transport mooncake``: start the processes, run the workload, stop them."""
    with Cluster(ranks) as cluster:
        return cluster.run(config, workload, checksum=checksum)


def summarize(
    config: WorldConfig, arrivals: list[Arrival], results: list[dict[str, Any]], elapsed: float
) -> dict[str, Any]:
    """The in-process summary's keys, over every rank, plus the ranks' agreement and the transfer throughput."""
    rooms = [a.room for a in arrivals]
    first = results[0]["outcomes"]
    agree = [r for r in rooms if all(_decision(res["outcomes"].get(r)) == _decision(first.get(r)) for res in results)]
    ended = [r for r in rooms if first.get(r, {}).get("state") in ("SUCCESS", "FAILED")]
    succeeded = [r for r in ended if first[r]["state"] == "SUCCESS"]
    verified = [r for r in succeeded if all(res["outcomes"].get(r, {}).get("verified") for res in results)]
    violations = _violations(rooms, results, agree, succeeded, verified)
    leaked = sum(res["owned_blocks"] for res in results)
    seconds = max(res["seconds"] for res in results)
    tokens = results[0]["tokens"]
    bytes_per_token = config.hidden_size * 2 * (1 + config.deepstack) + BYTES_PER_POSITION
    transfer = dict(results[0]["transfer"])
    if transfer.get("bytes") and seconds:
        transfer["end_to_end_gb_per_s"] = round(transfer["bytes"] / seconds / 1e9, 3)
    return {
        "requests": len(rooms),
        "succeeded": len(succeeded),
        "failed": len(ended) - len(succeeded),
        "unfinished": len(rooms) - len(ended),
        "resumed": sum(1 for r in ended if first[r]["resumes"] > 0),
        "resume_rounds": sum(first[r]["resumes"] for r in ended),
        "verified": len(verified),
        "mean_reads_per_request": round(sum(first[r]["reads"] for r in ended) / max(1, len(ended)), 3),
        "max_reads_per_request": max((first[r]["reads"] for r in ended), default=0),
        "leaked_blocks": leaked,
        "iterations": results[0]["iterations"],
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(ended) / seconds, 1) if seconds else 0.0,
        "payload_gb_per_s": round(tokens * bytes_per_token * len(results) / seconds / 1e9, 3) if seconds else 0.0,
        "config": {
            "block_size": config.block_size,
            "num_blocks": config.num_blocks,
            "default_alloc_tokens": config.default_alloc_tokens,
            "hidden_size": config.hidden_size,
            "deepstack": config.deepstack,
        },
        "violations": violations,
        "transport": "mooncake",
        "ranks": len(results),
        "verified_on_every_rank": len(verified) == len(succeeded),
        "fenced_blocks": [res["fenced_blocks"] for res in results],
        "causes": _causes(first, ended),
        "errors": {room: _errors(room, results) for room in ended if first[room]["error"]},
        "driver_seconds": round(elapsed, 3),
        "transfer": transfer,
        "per_rank": [
            {k: res[k] for k in ("rank", "iterations", "owned_blocks", "fenced_blocks", "fenced_rooms", "collectives")}
            | {"extension": res["extension"], "dropped": res["dropped"]}
            | {"seconds": round(res["seconds"], 3)}
            for res in results
        ],
    }


def _decision(outcome: dict[str, Any] | None) -> tuple[Any, ...]:
    """What every rank must have decided alike for a room: its end state, the cause, the total, the resumes."""
    if outcome is None:
        return (None,)
    return outcome["state"], outcome["cause"], outcome["total_tokens"], outcome["resumes"], outcome["reads"]


def _violations(
    rooms: list[int], results: list[dict[str, Any]], agree: list[int], succeeded: list[int], verified: list[int]
) -> list[str]:
    found = []
    if len(agree) != len(rooms):
        found.append(f"I9: the ranks ended {sorted(set(rooms) - set(agree))[:10]} differently")
    for room in sorted(set(succeeded) - set(verified)):
        wrong = {res["rank"]: res["outcomes"][room]["mismatches"] for res in results}
        found.append(f"I6: room {room} not bit-identical on every rank: {wrong}")
    for res in results:
        if res["owned_blocks"]:
            found.append(f"I5: rank {res['rank']}: {res['owned_blocks']} blocks still owned at the end")
        if res["fenced_blocks"] and not res["fenced_rooms"]:
            found.append(f"I5: rank {res['rank']}: {res['fenced_blocks']} blocks fenced by no request")
    return found


def _errors(room: int, results: list[dict[str, Any]]) -> list[str]:
    """Each rank's account of a failure: the sender's reason reaches the rank it failed on, the MIN the rest."""
    return sorted({res["outcomes"][room]["error"] for res in results if res["outcomes"].get(room, {}).get("error")})


def _causes(first: dict[int, dict[str, Any]], ended: list[int]) -> dict[str, int]:
    causes: dict[str, int] = {}
    for room in ended:
        cause = first[room]["cause"]
        if cause is not None:
            causes[cause] = causes.get(cause, 0) + 1
    return causes
