"""Tensor-parallel ranks simulated in one process: replicas of the bench that must stay in lockstep.

Each rank is a whole World (its own pool, allocator, queue, sender view and judge) with the same seed,
so every rank receives a full copy of every payload, as in the original. What differs between ranks is
what really differs in a server: when each rank sees a status, how far its clock has moved, and what it
found in its own aux row. The ranks' queues step in threads that take turns: one runs at a time, in rank
order, from one collective to the next, so a run is as deterministic as a single-rank one and a failing
schedule shrinks and replays. Every iteration ends with one more collective that names itself; a rank
that made fewer or other collectives than its peers meets them at a different name, and every rank raises
RankDivergence instead of waiting forever.

The judge adds I9 to each rank's own invariants: after every step the ranks hold the same requests in
the same states with the same blocks, totals and progress, and their pools agree block for block.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

from epd_receiver.adapters.kit.fair import run_fairly
from epd_receiver.adapters.kit.properties import early_fence_lifts, early_timeouts
from epd_receiver.adapters.kit.taking_turns import SimulatedRank, TakingTurns
from epd_receiver.adapters.kit.world import World
from epd_receiver.adapters.kit.world_config import WorldConfig
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.fsm import KVPoll, ReceiverQueue, ReceiverRequest, ReceiverSpec, Room
from epd_receiver.fsm.errors import RankDivergence

# The simulated ranks' RankGroup (taking_turns.py) and the #16 rig (eager_fan_in.py) are still importable from here.
_END_OF_ITERATION = "end of iteration"
_ON_EVERY_RANK = {  # World method -> replay event
    "abort": "abort",
    "release": "release",
    "go_backwards": "backwards",
}


class ReplicaWorld:
    """Several ranks of one Language-side server, driven with World's vocabulary plus per-rank skew."""

    def __init__(
        self,
        config: WorldConfig,
        ranks: int,
        *,
        seed: int = 0,
        bank_rows: int = 4096,
        spec: ReceiverSpec | None = None,
        request_class: type[ReceiverRequest[EmbeddingPayload]] = ReceiverRequest,
        queue_class: type[ReceiverQueue[EmbeddingPayload]] = ReceiverQueue,
    ) -> None:
        if ranks < 2:
            raise ValueError("a replica world has at least two ranks")
        self.config = config
        self._turns = TakingTurns(ranks)
        self.ranks = [
            World(
                config,
                seed=seed,
                bank_rows=bank_rows,
                spec=spec,
                request_class=request_class,
                queue_class=queue_class,
                ranks=SimulatedRank(self._turns, r),
                record=False,  # the replicas log the events, with the ranks they reached
            )
            for r in range(ranks)
        ]
        # a fault on one rank excuses the request's failure on every rank (I12), a death its timeout (I8)
        faulted: set[Room] = set()
        silenced: set[Room] = set()
        for world in self.ranks:
            world.judge.faulted, world.judge.silenced = faulted, silenced
        self.violations: list[str] = []
        self.log: list[dict[str, Any]] = []
        self._recording = True

    # ---- the vocabulary, on every rank unless ranks are named; logged as replay events -------------

    def arrive(
        self, room: Room, total_tokens: int, mrope_delta: int | None = None, **flags: bool
    ) -> ReceiverRequest[EmbeddingPayload]:
        requests = [world.arrive(room, total_tokens, mrope_delta, **flags) for world in self.ranks]
        self._record(self.ranks[0].log_of_arrival(room, total_tokens, **flags))
        return requests[0]

    def step(self, iterations: int = 1) -> list[ReceiverRequest[EmbeddingPayload]]:
        self._record({"step": iterations})
        finished: list[ReceiverRequest[EmbeddingPayload]] = []
        for _ in range(iterations):
            finished += self._step_all()[0]
            judges = [world.judge for world in self.ranks]
            found = self._disagreements() + early_timeouts(judges) + early_fence_lifts(judges)
            self.violations += [v for v in found if v not in self.violations]
        return finished

    def deliver(self, room: Room, blocks: int | None = None, ranks: Sequence[int] | None = None) -> bool:
        """The sender lands its chunk on the named ranks (all by default): the others see it later."""
        self._log("deliver", {"room": room, "blocks": blocks}, ranks)
        return any([self.ranks[r].deliver(room, blocks) for r in self._named(ranks)])

    def corrupt_aux(self, room: Room, value: int, ranks: Sequence[int] | None = None) -> bool:
        """A rank finds an impossible T in its A0[0] (#4: 'some ranks read aux 0')."""
        self._log("corrupt", {"room": room, "field": "total_tokens", "value": value}, ranks)
        return any([self.ranks[r].corrupt_aux(room, value) for r in self._named(ranks)])

    def corrupt_data(self, room: Room, ranks: Sequence[int] | None = None) -> bool:
        """A value flips in a landed chunk on the named ranks (all by default)."""
        self._log("corrupt", {"room": room, "field": "embeddings"}, ranks)
        return any([self.ranks[r].corrupt_data(room) for r in self._named(ranks)])

    def advance(self, seconds: float, ranks: Sequence[int] | None = None) -> None:
        self._log("advance", {"seconds": seconds}, ranks)
        for r in self._named(ranks):
            self.ranks[r].advance(seconds)

    def late_status(self, room: Room, status: KVPoll | None = None, ranks: Sequence[int] | None = None) -> bool:
        self._log("late", {"room": room, "status": None if status is None else int(status)}, ranks)
        return any([self.ranks[r].late_status(room, status) for r in self._named(ranks)])

    def fail(self, room: Room, ranks: Sequence[int] | None = None) -> None:
        self._log("fail", {"room": room}, ranks)
        for r in self._named(ranks):
            self.ranks[r].fail(room)

    def kill(self, room: Room, ranks: Sequence[int] | None = None) -> None:
        """The sender dies silently on the named ranks (all by default): the others' senders live on."""
        self._log("kill", {"room": room}, ranks)
        for r in self._named(ranks):
            self.ranks[r].kill(room)

    def stop(self, room: Room, ranks: Sequence[int] | None = None) -> bool:
        """The sender acts on the abort on the named ranks: a fence lifts once every rank's has."""
        self._log("stop", {"room": room}, ranks)
        return any([self.ranks[r].stop(room) for r in self._named(ranks)])

    def misreport(self, room: Room, status: int, ranks: Sequence[int] | None = None) -> bool:
        """A wrong next poll answer on the named ranks; refused while any rank still has one to give, since
        what the others answer decides what the MIN lets through."""
        self._log("misreport", {"room": room, "status": status}, ranks)
        if self._misreport_pending(room):
            return False
        taking = [r for r in self._named(ranks) if self.ranks[r].misreport_applies(room, status)]
        alone = len(taking) < len(self.ranks)
        return any([self.ranks[r].misreport(room, status, alone=alone) for r in taking])

    def misreport_landed(self, room: Room, delta: int, ranks: Sequence[int] | None = None) -> bool:
        self._log("misreport", {"room": room, "landed": delta}, ranks)
        if self._misreport_pending(room):
            return False
        taking = [r for r in self._named(ranks) if self.ranks[r].landed_misreport_applies(room, delta)]
        alone = len(taking) < len(self.ranks)  # the others answer the truth, and the MIN may keep it
        checked = all(world.chunk_unread(room) for world in self.ranks)
        return any([self.ranks[r].misreport_landed(room, delta, alone=alone, checked=checked) for r in taking])

    def _misreport_pending(self, room: Room) -> bool:
        return any(world.sender.misreport_pending(room) for world in self.ranks)

    def break_link(self, room: Room, call: str, ranks: Sequence[int] | None = None) -> bool:
        self._log("break", {"room": room, "call": call}, ranks)
        return any([self.ranks[r].break_link(room, call) for r in self._named(ranks)])

    def __getattr__(self, name: str) -> Callable[..., Any]:
        """Client and sender events that reach every rank alike: abort, release, kill, stop, ..."""
        if name not in _ON_EVERY_RANK:
            raise AttributeError(name)

        def on_every_rank(room: Room) -> bool:
            self._record({_ON_EVERY_RANK[name]: room})
            return any([getattr(world, name)(room) for world in self.ranks])

        return on_every_rank

    # ---- views shared with World (rank 0 speaks for all; I9 says they agree) -----------------------

    @property
    def version(self) -> tuple[int, ...]:
        """Changes with every event on any rank: every event reaches some rank's World."""
        return tuple(world.version for world in self.ranks)

    @property
    def queue(self) -> Any:
        return self.ranks[0].queue

    @property
    def sender(self) -> Any:
        return self.ranks[0].sender

    @property
    def allocator(self) -> Any:
        return self.ranks[0].allocator

    @property
    def outcomes(self) -> Any:
        return self.ranks[0].outcomes

    # ---- judging and the fair schedule ----------------------------------------------------------

    def check(self) -> list[str]:
        found = list(self.violations)
        for r, world in enumerate(self.ranks):
            found += [f"rank {r}: {v}" for v in world.check() if f"rank {r}: {v}" not in found]
        return found

    def drain(self, patience: int = 3, max_waits: int = 8, max_iterations: int = 2000) -> None:
        """Run to an end under a fair schedule, every rank seeing every status."""
        self._record({"drain": patience})
        self._recording = False
        with contextlib.ExitStack() as stack:
            stack.callback(setattr, self, "_recording", True)
            for world in self.ranks:
                stack.enter_context(world.fairly())
            run_fairly(self, patience, max_waits, max_iterations)
        for world in self.ranks:
            world.check_leaks()

    def unfinished(self) -> list[ReceiverRequest[EmbeddingPayload]]:
        return [r for world in self.ranks for r in world.unfinished()]

    def sender_round(self) -> None:
        for world in self.ranks:
            world.sender_round()

    def caller_round(self, held: Sequence[ReceiverRequest[EmbeddingPayload]]) -> None:
        for room in sorted({r.room for r in held}):
            self.release(room)

    def wait_out_dead_senders(self) -> bool:
        """Time passes for every rank alike when a silent sender on any rank holds a request up."""
        if not any([world.held_up_by_silence() for world in self.ranks]):
            return False
        for world in self.ranks:
            world.wait_out_deadlines()
        return True

    def snapshot(self) -> tuple[object, ...]:
        return tuple(world.snapshot() for world in self.ranks)

    def fingerprint(self) -> tuple[object, ...]:
        """Every rank's canonical state, and what the replicas found across ranks (I9)."""
        return (tuple(world.fingerprint() for world in self.ranks), tuple(self.violations))

    def scenario(self, **extra: Any) -> dict[str, Any]:
        return self.ranks[0].scenario(ranks=len(self.ranks), **extra) | {"events": list(self.log)}

    def checkpoint(self) -> None:
        for world in self.ranks:
            world.checkpoint()

    def report(self) -> dict[str, Any]:
        """Rank 0's report (I9 says the others agree), with every rank's violations."""
        return self.ranks[0].report() | {"ranks": len(self.ranks), "violations": self.check()}

    def _log(self, name: str, fields: dict[str, Any], ranks: Sequence[int] | None) -> None:
        fields = {k: v for k, v in fields.items() if v is not None}
        if ranks is not None:
            fields["ranks"] = list(ranks)
        self._record({name: fields})

    def _record(self, event: dict[str, Any]) -> None:
        if self._recording:
            self.log.append(event)

    # ---- helpers ---------------------------------------------------------------------------------

    def _named(self, ranks: Sequence[int] | None) -> Sequence[int]:
        return range(len(self.ranks)) if ranks is None else ranks

    def _step_all(self) -> list[list[ReceiverRequest[EmbeddingPayload]]]:
        results: list[list[ReceiverRequest[EmbeddingPayload]]] = [[] for _ in self.ranks]

        def run(r: int) -> None:
            self._turns.begin(r)
            try:
                results[r] = self.ranks[r].step()
                try:
                    self._turns.exchange(r, _END_OF_ITERATION, None)
                except RankDivergence as error:
                    self.ranks[r].violations.append(f"RankDivergence: {error}")
            finally:
                self._turns.end(r)

        threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(len(self.ranks))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self._turns.reset()
        return results

    def _disagreements(self) -> list[str]:
        """I9: the ranks made the same decisions, so they hold the same requests and pools; and I8 for
        fences, which must be lifted once every rank's clock is past the drain deadline."""
        first, *others = self.ranks
        drain = first.receiver_config.drain_timeout_s
        found = [
            f"I8: room {room} stayed fenced past the {drain:g} s drain deadline on every rank"
            for room in first.queue.fenced_rooms
            if drain is not None and all(world.overstayed(room, drain) for world in self.ranks)
        ]
        for r, world in enumerate(others, start=1):
            if world.allocator.free_list() != first.allocator.free_list():
                found.append(f"I9: rank {r}'s free list differs from rank 0's")
            rooms = {q.room for q in first.queue} | {q.room for q in world.queue}
            for room in sorted(rooms):
                mine, theirs = first.queue.get(room), world.queue.get(room)
                if _decisions(mine) != _decisions(theirs):
                    found.append(f"I9: room {room}: rank 0 {_decisions(mine)}, rank {r} {_decisions(theirs)}")
        return found


def _decisions(request: ReceiverRequest[EmbeddingPayload] | None) -> tuple[object, ...] | None:
    if request is None:
        return None
    return (request.state.name, request.blocks, request.fenced, request.total_tokens, request.landed, request.resumes)
