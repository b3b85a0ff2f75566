"""Tensor-parallel ranks over gloo: the RankGroup port for a server whose ranks run in separate processes.

Every call is one ``all_reduce(MIN)`` of an int64 frame. Gloo aborts the whole process when ranks pass
tensors of different lengths, so a frame never has a length a rank chose by itself: every rank keeps the
same capacity, and a header inside the frame says what each rank meant to send. MIN over a value and over
its negation gives the minimum and the maximum at once, so after the reduce every rank holds the same
reduced frame and reaches the same verdict from it (never from its own inputs): a divergence is raised,
and a disagreement answered, identically everywhere. When some rank needs more room than the capacity,
the header says so, every rank grows to the same new capacity and the call is made once more; that is
the only case of a second collective, and it happens a handful of times in a process's life.
"""

from __future__ import annotations

import datetime
import hashlib
import queue
import socket
import struct
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from epd_receiver.fsm.errors import RankDivergence, Room

_LIMIT = 1 << 62  # values and their negations must both fit in int64
_OP_INVALID, _OP_MIN_REDUCE, _OP_SAME = 0, 1, 2
_HEADER = 6  # op, -op, need, -need, hash, -hash


def rooms_digest(rooms: Sequence[Room]) -> int:
    """A 62-bit hash of the room list, order included: equal digests mean the ranks polled alike."""
    packed = struct.pack(f"<{len(rooms)}q", *rooms)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") % _LIMIT


class GlooRankGroup:
    """The RankGroup port over a gloo process group (the default group unless one is given)."""

    def __init__(self, group: dist.ProcessGroup | None = None, *, capacity: int = 64, owns_group: bool = False) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self._group = group
        self._capacity = capacity
        self._owns_group = owns_group
        self.collectives = 0  # all_reduce calls made, for callers that check the one-per-iteration budget

    @classmethod
    def connect(cls, rank: int, world_size: int, init_method: str, *, timeout_s: float = 60.0) -> GlooRankGroup:
        """Join (and own) the default gloo group, e.g. ``init_method="tcp://127.0.0.1:29500"``."""
        dist.init_process_group(
            "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        return cls(owns_group=True)

    def close(self) -> None:
        """Leave the group if this object created it; a group passed in belongs to its creator."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    @property
    def size(self) -> int:
        return dist.get_world_size(self._group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self._group)

    # ---- the port --------------------------------------------------------------------------------

    def min_reduce(self, rooms: Sequence[Room], values: Sequence[int]) -> list[int]:
        """Element-wise MIN of ``values`` over ranks; RankDivergence on every rank when the polls differ."""
        reduced = self._reduce(_OP_MIN_REDUCE, rooms_digest(rooms), list(values), [])
        if reduced is None:
            raise RankDivergence(f"ranks polled different rooms (this rank: {len(rooms)} rooms, {list(rooms)[:8]}...)")
        return reduced[: len(values)]

    def same(self, values: Sequence[int]) -> bool:
        """True on every rank iff every rank passed identical values, length included."""
        local = list(values)
        reduced = self._reduce(_OP_SAME, 0, local, [-v for v in local])
        if reduced is None:
            return False
        n = len(local)
        return all(low == -high for low, high in zip(reduced[:n], reduced[n : 2 * n], strict=True))

    # ---- framing ---------------------------------------------------------------------------------

    def _reduce(self, op: int, digest: int, mins: list[int], maxes: list[int]) -> list[int] | None:
        """Reduce ``mins`` with MIN and ``maxes`` (already negated) alongside; None when the headers differ.

        Ranks that called different operations, or sent different lengths or digests, all get None; the
        reduced body is returned otherwise, ``mins`` first and then the negated maxima.
        """
        body = mins + maxes
        out_of_range = [v for v in body if not -_LIMIT < v < _LIMIT]
        if out_of_range:  # still take part, so that the other ranks are not left waiting in the collective
            op, mins, body = _OP_INVALID, [], []
        per_value = 2 if maxes else 1
        while True:
            frame = self._frame(op, len(mins), digest, body)
            self._all_reduce(frame)
            op_low, op_high, need_low, need_high, digest_low, digest_high = frame[:_HEADER].tolist()
            if out_of_range:
                raise ValueError(
                    f"values must lie within +-2**62 to be reduced with their negations: {out_of_range[:4]}"
                )
            if op_low != -op_high:
                return None
            wanted = _HEADER + per_value * -need_high
            if wanted > self._capacity:  # seen alike by every rank: all grow alike and go round again
                self._capacity = _grown(self._capacity, wanted)
                continue
            if need_low != -need_high or digest_low != -digest_high:
                return None
            return frame[_HEADER : _HEADER + len(body)].tolist()

    def _frame(self, op: int, need: int, digest: int, body: list[int]) -> torch.Tensor:
        frame = torch.zeros(self._capacity, dtype=torch.int64)
        header = [op, -op, need, -need, digest, -digest]
        frame[:_HEADER] = torch.tensor(header, dtype=torch.int64)
        fits = body if len(body) <= self._capacity - _HEADER else []
        if fits:
            frame[_HEADER : _HEADER + len(fits)] = torch.tensor(fits, dtype=torch.int64)
        return frame

    def _all_reduce(self, frame: torch.Tensor) -> None:
        dist.all_reduce(frame, op=dist.ReduceOp.MIN, group=self._group)
        self.collectives += 1


def _grown(capacity: int, wanted: int) -> int:
    while capacity < wanted:
        capacity *= 2
    return capacity


# ---- rank processes -------------------------------------------------------------------------------


@dataclass(slots=True)
class RankContext:
    """What a job sees inside one rank process; ``cache`` keeps costly resources between jobs."""

    group: GlooRankGroup
    rank: int
    world_size: int
    cache: dict[str, Any] = field(default_factory=dict)


class RankJobFailed(RuntimeError):
    """A job raised in some rank process, or did not answer in time; the message has every rank's account."""


def free_port() -> int:
    """A TCP port free on loopback now (another process could take it before use; good enough on one host)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def collective(context: RankContext, kind: str, rooms: list[Room], values: list[int]) -> dict[str, Any]:
    """One call of the port, with what it returned or raised as plain data (diagnostics and tests)."""
    before = context.group.collectives
    try:
        result: Any = context.group.min_reduce(rooms, values) if kind == "min_reduce" else context.group.same(values)
    except RankDivergence as error:
        return {"raised": type(error).__name__, "collectives": context.group.collectives - before}
    return {"result": result, "collectives": context.group.collectives - before}


def _serve(rank: int, world_size: int, init_method: str, jobs: Any, results: Any, threads: int) -> None:
    """A rank process: join the group once, then run jobs until told to stop (a None job)."""
    torch.set_num_threads(threads)
    group = GlooRankGroup.connect(rank, world_size, init_method)
    context = RankContext(group, rank, world_size)
    results.put((rank, "ready", None))
    try:
        while (item := jobs.get()) is not None:
            job, args = item
            try:
                results.put((rank, "ok", job(context, *args)))
            except BaseException as error:
                results.put((rank, "error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        for close in context.cache.get("closers", []):
            close()
        group.close()


class RankProcesses:
    """N spawned rank processes joined in one gloo group, kept alive to run one job after another.

    Starting a Python process with torch costs seconds, so callers start these once and reuse them.
    Jobs are module-level functions ``job(context, *args)`` returning plain data (tensors returned from a
    child can only be rebuilt while it lives).
    """

    def __init__(self, world_size: int, *, start_timeout_s: float = 120.0, threads: int = 1) -> None:
        spawn = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.world_size = world_size
        self._results = spawn.Queue()
        self._jobs = [spawn.Queue() for _ in range(world_size)]
        self._processes = [
            spawn.Process(
                target=_serve,
                args=(rank, world_size, init_method, self._jobs[rank], self._results, threads),
                daemon=True,
                name=f"epd-rank-{rank}",
            )
            for rank in range(world_size)
        ]
        for process in self._processes:
            process.start()
        self._collect("ready", start_timeout_s)

    def run(self, job: Callable[..., Any], *args: Any, timeout_s: float = 300.0) -> list[Any]:
        """Run ``job`` with the same arguments on every rank at once; the results in rank order."""
        return self.run_each(job, [args] * self.world_size, timeout_s=timeout_s)

    def run_each(
        self, job: Callable[..., Any], args: Sequence[tuple[Any, ...]], *, timeout_s: float = 300.0
    ) -> list[Any]:
        """Run ``job`` on every rank at once, rank r with ``args[r]``; the results in rank order."""
        if len(args) != self.world_size:
            raise ValueError(f"{len(args)} argument tuples for {self.world_size} ranks")
        for jobs, own in zip(self._jobs, args, strict=True):
            jobs.put((job, tuple(own)))
        return self._collect("ok", timeout_s)

    def _collect(self, expected: str, timeout_s: float) -> list[Any]:
        answers: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(answers) < self.world_size:
            try:
                rank, kind, value = self._results.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                dead = [p.name for p in self._processes if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close()
                    raise RankJobFailed(
                        f"no answer from ranks {sorted(set(range(self.world_size)) - set(answers))} (dead: {dead})"
                    ) from None
                continue
            answers[rank] = (kind, value)
        failed = {rank: value for rank, (kind, value) in answers.items() if kind != expected}
        if failed:
            raise RankJobFailed("\n".join(f"rank {rank}: {value}" for rank, value in sorted(failed.items())))
        return [answers[rank][1] for rank in range(self.world_size)]

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._processes)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every rank: politely first, then by its own pid."""
        for process, jobs in zip(self._processes, self._jobs, strict=True):
            if process.is_alive():
                jobs.put(None)
        for process in self._processes:
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
                process.join(timeout_s)

    def __enter__(self) -> RankProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
