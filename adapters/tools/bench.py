"""``epd-receiver bench``: what the controller costs a scheduler, measured against the limits that matter.

Every ratio is measured side by side in one process, interleaved, so that both sides see the same machine:

- the poll overhead of one scheduler iteration over many in-flight requests whose polls change nothing,
  against a hand-written if/elif loop with the original receiver's logic (both poll the same links);
- the mean cost of a step that changes state;
- the bandwidth of assembling a resumed payload (A0 and the resume blocks into the output the caller
  receives, allocation included) against a plain ``copy_`` of as many bytes into memory already
  allocated, and against the original's per-block ``get_buf`` and ``torch.cat`` merge;
- the peak memory allocated while assembling, over the payload's bytes (torch's own allocation events);
- how often a resumed request reads the pool, and how fast the protocol fuzzer runs.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from epd_receiver.adapters.ports.allocator import OwningBlockAllocator
from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.payload import EmbeddingPayload, PayloadArena
from epd_receiver.fsm import KVPoll, ReceiverConfig, ReceiverQueue, State

GOALS: dict[str, tuple[str, float]] = {
    "poll_overhead_ratio": ("<=", 1.5),
    "transition_us": ("<=", 50.0),
    "assembly_vs_memcpy": (">=", 0.8),
    "assembly_vs_cat_baseline": (">=", 2.0),
    "peak_extra_memory_ratio": ("<=", 1.0),
    "reads_per_resumed_request": ("==", 2.0),
}


@dataclass(frozen=True, slots=True)
class BenchConfig:
    in_flight: int = 1000  # requests polled per scheduler iteration
    poll_iterations: int = 200
    lifecycles: int = 1000  # requests driven through a whole resumed life for transition_us
    hidden_size: int = 3584
    total_tokens: int = 16384  # 112 MiB of bf16 embeddings at H=3584
    default_tokens: int = 8192
    block_sizes: tuple[int, ...] = (128, 8192)
    repeats: int = 5
    fuzz_steps: int = 1000
    seed: int = 0
    threads: int | None = None  # torch's intra-op threads for the bench; None keeps torch's default


TINY = BenchConfig(
    in_flight=20,
    poll_iterations=5,
    lifecycles=20,
    hidden_size=8,
    total_tokens=96,
    default_tokens=40,
    block_sizes=(4, 64),
    repeats=2,
    fuzz_steps=20,
)


# ---- timing helpers --------------------------------------------------------------------------------


def _seconds(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _interleaved(actions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best seconds of each action, run in turns so that drift in the machine hits all of them alike.

    The best of several runs, not the median: on a shared machine the slower runs measure the neighbours.
    """
    samples: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            samples[name].append(_seconds(action))
    return {name: min(values) for name, values in samples.items()}


# ---- poll overhead and transitions -----------------------------------------------------------------


class _ScriptedLink:
    """A sender reduced to its status: init lands the first chunk (aux included), a resume stays in flight."""

    __slots__ = ("status",)

    def __init__(self) -> None:
        self.status = int(KVPoll.WaitingForInput)

    def poll(self) -> int:
        return self.status

    def init(self, blocks: Sequence[int], allocated_tokens: int) -> None:
        self.status = int(KVPoll.Transferring)  # the pool's aux rows were written beforehand: T=2 everywhere

    def resume(self, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None:
        pass  # the remainder is in flight: the sender keeps reporting Transferring

    def abort(self) -> None:
        pass


class _CountingBuffers(TorchBlockBuffers):
    """The pool, counting the reads that reach it per payload (the judge of reads_per_resumed_request)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: dict[int, int] = {}

    def gather(self, blocks: Sequence[int], tokens: int, into: EmbeddingPayload, at: int) -> None:
        self.reads[id(into)] = self.reads.get(id(into), 0) + 1
        super().gather(blocks, tokens, into, at)


@dataclass(slots=True)
class _Resumed:
    """Requests in flight after their resume: every poll says Transferring, which changes nothing."""

    queue: ReceiverQueue[EmbeddingPayload]
    links: list[_ScriptedLink]
    buffers: _CountingBuffers
    transition_seconds: float = 0.0


def _resumed_queue(requests: int) -> _Resumed:
    """``requests`` requests of two one-token blocks each, driven (and timed) to RESUMING: 4 transitions each."""
    buffers = _CountingBuffers(2 * requests, 1, 1, arena=PayloadArena(1))
    buffers.aux[:, 0] = 2  # the sender's work, done before the clock starts: every row could be an A0[0]
    queue: ReceiverQueue[EmbeddingPayload] = ReceiverQueue(
        buffers, OwningBlockAllocator(2 * requests, 1), ReceiverConfig(default_alloc_tokens=1)
    )
    links = [_ScriptedLink() for _ in range(requests)]
    for room, link in enumerate(links):
        queue.add(room, link)
    # handshake_done + blocks_granted, then first_chunk_landed + blocks_granted (A0 read, resume sent)
    elapsed = _seconds(queue.step) + _seconds(queue.step)
    if any(r.state is not State.RESUMING for r in queue):
        raise RuntimeError("the bench's requests did not reach RESUMING")
    return _Resumed(queue, links, buffers, elapsed)


@dataclass(slots=True)
class _OriginalEntry:
    """What the original transfer queue keeps per request (the fields its Transferring branch looks at)."""

    receiver: Any
    partial_input_embeds: Any = None
    is_fake: bool = False
    embedding_indices: list[int] = field(default_factory=list)


class _OriginalTransferQueue:
    """The original's pop_transferred as a hand-written if/elif loop, single rank (no collective)."""

    def __init__(self, entries: list[_OriginalEntry]) -> None:
        self.queue = entries

    def pop_transferred(self) -> list[_OriginalEntry]:
        if not self.queue:
            return []
        polls = [int(entry.receiver.poll()) for entry in self.queue]
        transferred: list[_OriginalEntry] = []
        remove: set[int] = set()
        for i, (entry, poll) in enumerate(zip(self.queue, polls, strict=True)):
            if poll == KVPoll.Failed:
                remove.add(i)
            elif poll == KVPoll.Success:
                transferred.append(entry)
                remove.add(i)
            elif poll == KVPoll.Transferring:
                if entry.is_fake or entry.partial_input_embeds is not None:
                    continue  # resumed already: wait for Success
                raise AssertionError("the bench only polls resumed requests")
            elif poll in (KVPoll.Bootstrapping, KVPoll.WaitingForInput):
                pass
            else:
                raise ValueError("unexpected poll")
        self.queue = [entry for i, entry in enumerate(self.queue) if i not in remove]
        return transferred


def poll_overhead(config: BenchConfig) -> dict[str, float]:
    """Microseconds per scheduler iteration over ``in_flight`` quiet requests: ours, the original's, ratio."""
    ours = _resumed_queue(config.in_flight)
    original = _OriginalTransferQueue([_OriginalEntry(link, partial_input_embeds=True) for link in ours.links])

    def ours_iterations() -> None:
        for _ in range(config.poll_iterations):
            ours.queue.step()

    def original_iterations() -> None:
        for _ in range(config.poll_iterations):
            original.pop_transferred()

    medians = _interleaved({"ours": ours_iterations, "original": original_iterations}, config.repeats)
    if any(r.state is not State.RESUMING for r in ours.queue) or len(original.queue) != config.in_flight:
        raise RuntimeError("a quiet poll changed something")
    ours_us = medians["ours"] / config.poll_iterations * 1e6
    original_us = medians["original"] / config.poll_iterations * 1e6
    return {
        "poll_iteration_us": round(ours_us, 2),
        "poll_iteration_original_us": round(original_us, 2),
        "poll_overhead_ratio": round(ours_us / original_us, 3),
    }


def transitions(config: BenchConfig) -> dict[str, float]:
    """Whole resumed lives: handshake, A0, first chunk, remainder, Success (5 state changes), pool reads.

    The steps that carry them are timed whole (poll, dispatch, allocation, collection included), so the
    mean is an upper bound of a single transition's cost; the best of ``repeats`` fresh runs is kept.
    """
    best = math.inf
    reads: list[int] = []
    for _ in range(config.repeats):
        resumed = _resumed_queue(config.lifecycles)
        for link in resumed.links:
            link.status = int(KVPoll.Success)
        best = min(best, resumed.transition_seconds + _seconds(resumed.queue.step))
        requests = list(resumed.queue)
        if any(r.state is not State.SUCCESS or r.resumes != 1 for r in requests):
            raise RuntimeError("the bench's requests did not all end in SUCCESS after one resume")
        reads += [resumed.buffers.reads[id(r.payload)] for r in requests]
    return {
        "transition_us": round(best / (5 * config.lifecycles) * 1e6, 2),
        "reads_per_resumed_request": statistics.mean(reads),
        "max_reads_per_resumed_request": max(reads),
    }


# ---- assembly --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Resume:
    """One resumed payload sitting in the pool: A0 holds the first S tokens, A1 the remaining R."""

    pool: TorchBlockBuffers
    a0: list[int]
    a1: list[int]
    total: int
    sent: int

    @property
    def payload_bytes(self) -> int:
        h, k = self.pool.hidden_size, self.pool.deepstack_layers
        return self.total * (2 * h * (1 + k) + 4 + 12)


def _resume_case(config: BenchConfig, block_size: int) -> _Resume:
    h, b = config.hidden_size, block_size
    a0 = -(-config.default_tokens // b)
    sent = a0 * b
    if sent >= config.total_tokens:
        raise ValueError(f"T={config.total_tokens} fits in A0 ({sent} tokens at B={b}): nothing to resume")
    a1 = -(-(config.total_tokens - sent) // b)
    pool = TorchBlockBuffers(a0 + a1 + 2, b, h, arena=PayloadArena(h))
    pool.embeddings.view(torch.int16).random_(0, 1 << 14, generator=torch.Generator().manual_seed(config.seed))
    pool.fill_ids.random_(0, 1 << 16)
    pool.mrope_positions.random_(0, 1 << 16)
    order = torch.randperm(pool.num_blocks, generator=torch.Generator().manual_seed(config.seed)).tolist()
    return _Resume(pool, order[:a0], order[a0 : a0 + a1], config.total_tokens, sent)


def _assemble(case: _Resume) -> EmbeddingPayload:
    """Ours: one output (from the arena when the pool has one), A0 into [0, S), A1 into [S, T)."""
    payload = case.pool.new_payload(case.total, 0)
    case.pool.gather(case.a0, case.sent, payload, 0)
    case.pool.gather(case.a1, case.total - case.sent, payload, case.sent)
    return payload


def _original_get_buf(pool: TorchBlockBuffers, blocks: Sequence[int], total: int) -> tuple[torch.Tensor, ...]:
    """The original's read: a view per block, joined by ``torch.cat`` into fresh tensors."""
    b, h = pool.block_size, pool.hidden_size
    embeddings, ids, mrope = [], [], []
    gathered = 0
    for block in blocks:
        n = min(b, total - gathered)
        embeddings.append(pool.embeddings[block, : n * h].view(n, h))
        ids.append(pool.fill_ids[block, :n])
        mrope.append(pool.mrope_positions[block, : 3 * n].view(3, n))
        gathered += n
        if gathered >= total:
            break
    return torch.cat(embeddings), torch.cat(ids), torch.cat(mrope, dim=-1)


def _original_assemble(case: _Resume) -> tuple[torch.Tensor, ...]:
    """The original's path: read A0 and clone it at Transferring, read A1 at Success, concatenate."""
    embeddings, ids, mrope = _original_get_buf(case.pool, case.a0, case.sent)
    partial_embeddings, partial_mrope, partial_ids = embeddings.clone(), mrope.clone(), ids.tolist()
    del embeddings, ids, mrope
    rest_embeddings, rest_ids, rest_mrope = _original_get_buf(case.pool, case.a1, case.total - case.sent)
    return (
        torch.cat([partial_embeddings, rest_embeddings]),
        torch.cat([torch.tensor(partial_ids, dtype=torch.int32), rest_ids]),
        torch.cat([partial_mrope, rest_mrope], dim=-1),
    )


def _peak_allocated(action: Callable[[], object]) -> int:
    """The highest number of bytes torch had allocated on top of what it held before ``action`` began."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = action()
    del result
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def assembly(config: BenchConfig, block_size: int) -> dict[str, float]:
    """Bandwidth and peak memory of ours (warm arena, and fresh output) against memcpy and the original."""
    case = _resume_case(config, block_size)
    nbytes = case.payload_bytes
    arena = case.pool.arena
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(7)
    dst = torch.empty_like(src).copy_(src)  # already allocated and touched: the best a copy can do

    def ours() -> None:
        case.pool.recycle(_assemble(case))  # handed back at once, as the caller's release would be

    check = _assemble(case)  # also the warm-up: the arena's storage is faulted in once, here
    expected = _original_assemble(case)
    assembled = (check.embeddings, check.fill_ids, check.mrope_positions)
    if not all(torch.equal(a, b) for a, b in zip(expected, assembled, strict=True)):
        raise RuntimeError("our assembly and the original's differ")
    case.pool.recycle(check)
    seconds = _interleaved(
        {
            "ours": ours,
            "memcpy": lambda: dst.copy_(src),
            "original": lambda: _original_assemble(case),
            "fresh": lambda: _assemble_fresh(case),
        },
        config.repeats,
    )
    rate = {name: nbytes / s / 1e9 for name, s in seconds.items()}
    peak_ours = _peak_allocated(ours)
    peak_fresh = _peak_allocated(lambda: _assemble_fresh(case))
    peak_original = _peak_allocated(lambda: _original_assemble(case))
    return {
        "block_size": block_size,
        "payload_mib": round(nbytes / 2**20, 1),
        "assembly_gb_per_s": round(rate["ours"], 3),
        "memcpy_gb_per_s": round(rate["memcpy"], 3),
        "cat_baseline_gb_per_s": round(rate["original"], 3),
        "fresh_output_gb_per_s": round(rate["fresh"], 3),
        "assembly_vs_memcpy": round(rate["ours"] / rate["memcpy"], 3),
        "fresh_output_vs_memcpy": round(rate["fresh"] / rate["memcpy"], 3),
        "assembly_vs_cat_baseline": round(rate["ours"] / rate["original"], 3),
        "peak_extra_memory_ratio": round(peak_ours / nbytes, 4),
        "peak_extra_memory_ratio_fresh_output": round(peak_fresh / nbytes, 4),
        "peak_extra_memory_ratio_cat_baseline": round(peak_original / nbytes, 4),
        "arena_idle_mib": round((arena.idle_bytes if arena else 0) / 2**20, 1),
    }


def _assemble_fresh(case: _Resume) -> EmbeddingPayload:
    arena, case.pool.arena = case.pool.arena, None
    try:
        return _assemble(case)
    finally:
        case.pool.arena = arena


# ---- the fuzzer ------------------------------------------------------------------------------------


def fuzz_rate(steps: int, seed: int = 0) -> float | None:
    """Rule steps per second of the protocol fuzzer (every invariant judged after each); None without hypothesis."""
    try:
        from hypothesis import HealthCheck, Phase, settings
        from hypothesis.stateful import invariant, run_state_machine_as_test
    except ImportError:
        return None
    from epd_receiver.adapters.kit.fuzz import ReceiverProtocol

    counted = [0]

    class Counted(ReceiverProtocol):
        @invariant()
        def count_the_step(self) -> None:
            counted[0] += 1

    step_count = 50
    options = settings(
        max_examples=max(1, math.ceil(steps / step_count)),
        stateful_step_count=step_count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    elapsed = _seconds(lambda: run_state_machine_as_test(Counted, settings=options))
    return round(counted[0] / elapsed, 1)


def walk_rate(steps: int, seed: int = 0) -> float:
    """Judged steps per second of the random walk (``walk.py``) on one rank, as ``fuzz_rate``: every
    invariant judged after each event; building the worlds and draining them are in the time, and an
    event the World refused is judged but not counted. (Whether the walk is clean is the tests' business.)"""
    from epd_receiver.adapters.kit.walk import walk

    return walk(steps, seed).steps_per_s


# ---- the whole bench -------------------------------------------------------------------------------


def run_bench(config: BenchConfig = BenchConfig()) -> dict[str, Any]:
    """Every figure, the worst case over the block sizes as the headline, and each goal's verdict.

    ``threads`` matters on a small shared machine: a multi-threaded copy waits at its barrier for a thread
    that a neighbour's process has preempted, and indexed copies suffer more from it than a plain one.
    """
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_bench(config)
    finally:
        torch.set_num_threads(threads)


def _run_bench(config: BenchConfig) -> dict[str, Any]:
    result: dict[str, Any] = {}
    result |= poll_overhead(config)
    result |= transitions(config)
    cases = [assembly(config, b) for b in config.block_sizes]
    result["assembly_by_block_size"] = cases
    result["assembly_vs_memcpy"] = min(c["assembly_vs_memcpy"] for c in cases)
    result["assembly_vs_cat_baseline"] = min(c["assembly_vs_cat_baseline"] for c in cases)
    result["peak_extra_memory_ratio"] = max(c["peak_extra_memory_ratio"] for c in cases)
    result["fuzz_steps_per_s"] = fuzz_rate(config.fuzz_steps, config.seed)
    # twenty times the fuzzer's steps: at the walk's rate, a span of the same order as the fuzzer's
    result["walk_steps_per_s"] = walk_rate(20 * config.fuzz_steps, config.seed)
    result["goals"] = {key: _verdict(key, result[key]) for key in GOALS}
    result["machine"] = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    result["config"] = asdict(config)
    return result


def _verdict(key: str, value: float) -> dict[str, Any]:
    op, goal = GOALS[key]
    met = {"<=": value <= goal, ">=": value >= goal, "==": value == goal}[op]
    return {"goal": f"{op} {goal:g}", "met": met}
