"""What the controller costs a scheduler iteration: quiet polls against the original's loop, and transitions.

Both sides poll the same scripted links, which stand for senders reduced to their status; the pool's
reads are counted per payload, which is how ``reads_per_resumed_request`` is judged.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from epd_receiver.adapters.ports.allocator import OwningBlockAllocator
from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.payload import EmbeddingPayload, PayloadArena
from epd_receiver.adapters.tools.bench_config import BenchConfig
from epd_receiver.adapters.tools.bench_timing import interleaved, seconds
from epd_receiver.fsm import KVPoll, ReceiverConfig, ReceiverQueue, State


class ScriptedLink:
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
    """The pool, counting the reads that reach it per payload (the judge of reads_per_resumed_request) and
    the seconds they took (the payload's own copy, which the scale section leaves out of a state change)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: dict[int, int] = {}
        self.gather_seconds = 0.0

    def gather(self, blocks: Sequence[int], tokens: int, into: EmbeddingPayload, at: int) -> None:
        self.reads[id(into)] = self.reads.get(id(into), 0) + 1
        started = time.perf_counter()
        super().gather(blocks, tokens, into, at)
        self.gather_seconds += time.perf_counter() - started


@dataclass(slots=True)
class Resumed:
    """Requests in flight after their resume: every poll says Transferring, which changes nothing."""

    queue: ReceiverQueue[EmbeddingPayload]
    links: list[ScriptedLink]
    buffers: _CountingBuffers
    transition_seconds: float = 0.0


def resumed_queue(requests: int) -> Resumed:
    """``requests`` requests of two one-token blocks each, driven (and timed) to RESUMING: 4 transitions each."""
    buffers = _CountingBuffers(2 * requests, 1, 1, arena=PayloadArena(1))
    buffers.aux[:, 0] = 2  # the sender's work, done before the clock starts: every row could be an A0[0]
    queue: ReceiverQueue[EmbeddingPayload] = ReceiverQueue(
        buffers, OwningBlockAllocator(2 * requests, 1), ReceiverConfig(default_alloc_tokens=1)
    )
    links = [ScriptedLink() for _ in range(requests)]
    for room, link in enumerate(links):
        queue.add(room, link)
    # handshake_done + blocks_granted, then first_chunk_landed + blocks_granted (A0 read, resume sent)
    elapsed = seconds(queue.step) + seconds(queue.step)
    if any(r.state is not State.RESUMING for r in queue):
        raise RuntimeError("the bench's requests did not reach RESUMING")
    return Resumed(queue, links, buffers, elapsed)


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


def quiet_seconds(ours: Resumed, iterations: int, repeats: int) -> tuple[float, float]:
    """Seconds of one quiet iteration over ``ours``'s requests, and of the original's loop over the same links,
    timed in turns; a quiet poll that changed anything is an error."""
    queue = ours.queue
    original = _OriginalTransferQueue([_OriginalEntry(link, partial_input_embeds=True) for link in ours.links])

    def ours_iterations() -> None:
        for _ in range(iterations):
            queue.step()

    def original_iterations() -> None:
        for _ in range(iterations):
            original.pop_transferred()

    queue.step()  # a first quiet iteration builds what the quiet ones reuse
    best = interleaved({"ours": ours_iterations, "original": original_iterations}, repeats)
    if any(r.state is not State.RESUMING for r in queue) or len(original.queue) != len(ours.links):
        raise RuntimeError("a quiet poll changed something")
    return best["ours"] / iterations, best["original"] / iterations


def poll_overhead(config: BenchConfig) -> dict[str, float]:
    """Microseconds per scheduler iteration over ``in_flight`` quiet requests: ours, the original's, ratio."""
    ours_s, original_s = quiet_seconds(resumed_queue(config.in_flight), config.poll_iterations, config.repeats)
    return {
        "poll_iteration_us": round(ours_s * 1e6, 2),
        "poll_iteration_original_us": round(original_s * 1e6, 2),
        "poll_overhead_ratio": round(ours_s / original_s, 3),
    }


def transitions(config: BenchConfig) -> dict[str, float]:
    """Whole resumed lives: handshake, A0, first chunk, remainder, Success (5 state changes), pool reads.

    The steps that carry them are timed whole (poll, dispatch, allocation, collection included), so the
    mean is an upper bound of a single transition's cost; the best of ``repeats`` fresh runs is kept.
    """
    best = math.inf
    reads: list[int] = []
    for _ in range(config.repeats):
        resumed = resumed_queue(config.lifecycles)
        for link in resumed.links:
            link.status = int(KVPoll.Success)
        best = min(best, resumed.transition_seconds + seconds(resumed.queue.step))
        requests = list(resumed.queue)
        if any(r.state is not State.SUCCESS or r.resumes != 1 for r in requests):
            raise RuntimeError("the bench's requests did not all end in SUCCESS after one resume")
        reads += [resumed.buffers.reads[id(r.payload)] for r in requests]
    return {
        "transition_us": round(best / (5 * config.lifecycles) * 1e6, 2),
        "reads_per_resumed_request": statistics.mean(reads),
        "max_reads_per_resumed_request": max(reads),
    }
