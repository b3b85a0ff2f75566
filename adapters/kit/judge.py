"""The judge: whether each invariant of spec/RECEIVER.md §5 held, decided from the world, not the controller.

It knows what the sender was asked and wrote (its message log and sources), what the allocator says each
block belongs to, which reads reached the pool, which rows the sender wrote and which faults the world
injected; it never consults the controller's reasoning. The world tells it what happened (``arrived``,
``aux_read``, ``gathered``, ``wrote``, ``observe``, ``iteration``); each invariant has a method of its
own that lists what broke it, found as it happened or visible in the current state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from epd_receiver.adapters.kit.properties import allocation_order, early_fence_lifts, early_timeouts, liveness
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.fsm import KVPoll, ReceiverError, ReceiverRequest, Room, State, TimedOut, load_spec

if TYPE_CHECKING:
    from epd_receiver.adapters.kit.world import World

Request = ReceiverRequest[EmbeddingPayload]
# I7's order: the spec declares its states in the order a request moves through them.
STATE_ORDER = {state: rank for rank, state in enumerate(load_spec().states)}
MAX_READS_PER_REQUEST = 2


def label(violation: str) -> str:
    """``I5``, or the contract's error type, from a violation message (``rank N:`` prefixes dropped)."""
    head = re.sub(r"^rank \d+: ", "", violation).split(":", 1)[0].strip()
    return head if re.fullmatch(r"I\d+|\w+Error|\w+Window|\w+Divergence", head) else "exception"


@dataclass(slots=True)
class Outcome:
    """What the judge saw of one request."""

    room: Room
    total_tokens: int
    states: list[State] = field(default_factory=list)
    aux_reads: int = 0
    verified: bool | None = None
    released: bool = False
    reads: int = 0
    resumes: int = 0
    error: str | None = None
    total: int | None = None
    landed: int = 0
    warmup: bool = False


class Judge:
    def __init__(self, world: World) -> None:
        self.world = world
        self.outcomes: dict[Room, Outcome] = {}
        self.violations: list[str] = []  # in the order they were found; the world adds its contract errors
        self.entered: dict[Room, float] = {}  # when each request entered its state (or round)
        self.stage: dict[Room, tuple[State, int]] = {}
        self.expect_failure: set[Room] = set()  # rooms given input that cannot be true: they must fail (I10)
        self.faulted: set[Room] = set()  # rooms any fault touched, on any rank: they need not succeed (I12)
        # rooms whose sender died, or answered a poll with stale news, on any rank: they may time out (I8)
        self.silenced: set[Room] = set()
        self.fair = False  # under a fair schedule a live sender's request must not time out (I8)
        self.honest = True  # False when the bench's sender is rigged with a bug of its own: nothing is owed
        self.timed_out: dict[Room, tuple[State, float]] = {}  # this iteration: the state left, time spent there
        self.lifted: list[Room] = []  # this iteration: rooms whose fence lifted

    # ---- what the world tells the judge --------------------------------------------------------------

    def arrived(self, request: Request, total_tokens: int, *, warmup: bool) -> None:
        self.outcomes[request.room] = Outcome(request.room, total_tokens, [request.state], warmup=warmup)
        self.entered[request.room] = self.world.clock.now()
        self.stage[request.room] = self._stage_of(request)

    def add(self, found: Sequence[str]) -> None:
        self.violations += [v for v in found if v not in self.violations]

    def aux_read(self, block: int) -> None:
        owner = self._owner_of((block,))
        if owner is None:
            return
        outcome = self.outcomes[owner]
        outcome.aux_reads += 1
        messages = self.world.sender.room_messages(owner)
        first = messages[0].blocks[0] if messages else None
        if block != first:
            self.violations.append(f"I2: room {owner} read aux of block {block}, its A0[0] is {first}")
        if outcome.aux_reads > 1:
            self.violations.append(f"I2: room {owner} read an aux row {outcome.aux_reads} times")

    def gathered(self, blocks: tuple[int, ...]) -> None:
        owner = self._owner_of(blocks)
        if owner is None:
            return
        sender = self.world.sender
        in_flight = set(blocks) & sender.writing_blocks()
        if in_flight:
            self.violations.append(f"I1: room {owner} read blocks {sorted(in_flight)} the sender has yet to write")
        messages = sender.room_messages(owner)
        if not messages or messages[-1].blocks != blocks:
            self.violations.append(f"I1: room {owner} read {list(blocks)}, not the allocation it sent last")
        if not {KVPoll.Transferring, KVPoll.Success} & set(sender.published(owner)):
            self.violations.append(f"I1: room {owner} read before any chunk landed")

    def wrote(self, writes: Sequence[tuple[Room, int]]) -> None:
        """The sender may write only into rows its room owns or fences: a write into a free row, or into
        another request's, corrupts whoever is handed that row next (#23)."""
        for room, block in writes:
            kind, holder = self.world.allocator.holder(block)
            if holder != room:
                whose = kind if holder is None else f"{kind} by room {holder}"
                self.violations.append(f"I5: the sender wrote room {room}'s data into block {block}, which is {whose}")

    def observe(self, ended: Sequence[Request] = ()) -> None:
        """The states after an event: entry times for deadlines, deadline failures for I13, moves for I7."""
        world = self.world
        for request in [*world.queue, *ended]:
            room = request.room
            stage = self._stage_of(request)
            seen = self.outcomes[room].states
            last = seen[-1]
            if request.state is State.FAILED and last is not State.FAILED and isinstance(request.error, TimedOut):
                self.timed_out[room] = (last, world.clock.now() - self.entered[room])
            if self.stage.get(room) != stage:  # a new state, or the same state for a new round
                self.stage[room] = stage
                self.entered[room] = world.clock.now()
            if last is request.state:
                continue
            next_round = (last, request.state) == (State.RESUMING, State.WAITING_FOR_BLOCKS) and (
                world.sender.has_progress(room)
            )
            if last in (State.SUCCESS, State.FAILED) or (
                request.state is not State.FAILED and STATE_ORDER[request.state] < STATE_ORDER[last] and not next_round
            ):
                self.violations.append(f"I7: room {room} went {last.name} -> {request.state.name}")
            seen.append(request.state)

    def before_iteration(self) -> tuple[dict[Room, int], list[Room]]:
        """What the iteration's judgement compares with: messages each sender had, rooms fencing."""
        self.timed_out, self.lifted = {}, []
        sender = self.world.sender
        return {room: len(sender.room_messages(room)) for room in sender.rooms()}, [
            r.room for r in self.world.queue if r.fenced
        ]

    def iteration(self, ended: Sequence[Request], sent_before: Mapping[Room, int], fencing: Sequence[Room]) -> None:
        """After one scheduler iteration: ends, late deadlines (I8), allocation order (I14) and, on one rank,
        early deadlines (I13; on several ranks the replicas judge those once every rank has stepped)."""
        world = self.world
        self.observe(ended)
        for request in ended:
            self.ended(request)
        self._late_deadlines()
        self.lifted = [room for room in fencing if not getattr(world.queue.get(room), "fenced", ())]
        self.add(allocation_order(self, sent_before))
        if world.queue.rank_count == 1:
            self.add(early_timeouts([self]) + early_fence_lifts([self]))

    def ended(self, request: Request) -> None:
        outcome = self.outcomes[request.room]
        if outcome.verified is not None:
            return
        outcome.reads, outcome.resumes = request.reads, request.resumes
        outcome.total, outcome.landed = request.total_tokens, request.landed
        outcome.error = str(request.error) if request.error else None
        sender = self.world.sender
        # two reads, plus one per extra round when the sender reports progress
        allowed = MAX_READS_PER_REQUEST + max(0, request.resumes - 1) * sender.has_progress(request.room)
        if request.reads > allowed:
            self.violations.append(f"I1: room {request.room} read the pool {request.reads} times")
        if request.state is State.FAILED:
            self._failed(request, outcome)
            return
        if outcome.warmup:
            outcome.verified = request.reads == 0 and request.payload is None
            if not outcome.verified:
                self.violations.append(f"I11: warm-up room {request.room} read the pool")
            return
        if request.room in self.expect_failure:
            self.violations.append(
                f"I10: room {request.room} succeeded on corrupt input (aux row, data or a status it could not send)"
            )
        assert request.payload is not None
        wrong = sender.source(request.room).mismatches(request.payload)
        outcome.verified = not wrong
        if wrong:
            self.violations.append(f"I6: room {request.room} payload differs from the sender's: {wrong}")

    def leaks(self) -> None:
        """After draining, nothing may be left owned or fenced (I5)."""
        allocator = self.world.allocator
        if allocator.owned_count or allocator.fenced_count:
            leaked = {"owned": allocator.owners(), "fenced": allocator.fences()}
            self.violations.append(f"I5: blocks leaked after drain: {leaked}")

    def overstayed(self, room: Room, limit: float) -> bool:
        return self.world.clock.now() - self.entered[room] > limit

    # ---- one method per invariant ------------------------------------------------------------------

    def i1_reads_only_landed_blocks(self) -> list[str]:
        return self._of("I1")

    def i2_one_aux_read_by_value(self) -> list[str]:
        return self._of("I2")

    def i3_message_arithmetic(self) -> list[str]:
        return self._of("I3")

    def i4_one_resume_per_stage(self) -> list[str]:
        return self._of("I4")

    def i5_every_block_has_one_holder(self) -> list[str]:
        return self._of("I5")

    def i6_payload_is_what_was_sent(self) -> list[str]:
        return self._of("I6")

    def i7_states_move_forward(self) -> list[str]:
        return self._of("I7")

    def i8_nothing_waits_forever(self) -> list[str]:
        return self._of("I8")

    def i10_bad_input_fails_closed(self) -> list[str]:
        return self._of("I10")

    def i11_warmups_touch_nothing(self) -> list[str]:
        return self._of("I11")

    def i12_good_requests_succeed(self) -> list[str]:
        return self._of("I12")

    def i13_deadlines_are_not_early(self) -> list[str]:
        return self._of("I13")

    def i14_allocation_serves_the_head_first(self) -> list[str]:
        return self._of("I14")

    def check(self) -> list[str]:
        """Every violation so far, in the order found, then those only visible in the current state."""
        found = list(self.violations)
        return found + [v for v in self._visible_now() if v not in found]

    def checkpoint(self) -> None:
        """Keep what the current state shows: a replay is judged after every event, like the fuzzer."""
        self.add(self._visible_now())

    # ---- helpers ---------------------------------------------------------------------------------

    def _stage_of(self, request: Request) -> tuple[State, int]:
        """A state, and for a resuming request the round: a deadline counts from the entry of either."""
        sender = self.world.sender
        room = request.room
        return request.state, len(sender.room_messages(room)) if room in sender.rooms() else -1

    def _of(self, invariant: str) -> list[str]:
        return [v for v in self.check() if label(v) == invariant]

    def _visible_now(self) -> list[str]:
        return self._messages() + self._ownership()

    def _failed(self, request: Request, outcome: Outcome) -> None:
        outcome.verified = False
        room = request.room
        self.add(liveness(self, request))
        if self.fair and isinstance(request.error, TimedOut) and room not in self.silenced:
            self.violations.append(f"I8: room {room} timed out under a fair schedule: {request.error}")
        if not isinstance(request.error, ReceiverError) or request.error.room != room:
            self.violations.append(f"I10: room {room} failed without a typed error: {request.error!r}")

    def _late_deadlines(self) -> None:
        """After an iteration no request may have stayed in its state longer than its deadline (I8).

        A fence's deadline is due when every rank's clock has passed it, which one rank cannot see: with
        several ranks the replicas judge it (``ReplicaWorld``).
        """
        world = self.world
        for request in world.queue:
            limit = world.deadlines.get(request.state)
            if request.state is State.FAILED and world.queue.rank_count > 1:
                continue
            if limit is not None and self.overstayed(request.room, limit):
                self.violations.append(
                    f"I8: room {request.room} stayed {request.state.name} past its {limit:g} s deadline"
                )

    def _owner_of(self, blocks: tuple[int, ...]) -> Room | None:
        allocator = self.world.allocator
        owners = {room for room, held in allocator.owners().items() if set(blocks) & set(held)}
        if len(owners) != 1 or not set(blocks) <= set(allocator.owned_by(next(iter(owners)))):
            self.violations.append(f"I5: read of blocks {list(blocks)} owned by {sorted(owners) or 'nobody'}")
            return None
        return next(iter(owners))

    def _messages(self) -> list[str]:
        """I3 and I4 over the sender's message log."""
        found = []
        b = self.world.config.block_size
        last_sent: dict[Room, int] = {}
        for m in self.world.sender.messages:
            if m.allocated_tokens != len(m.blocks) * b:
                found.append(
                    f"I3: room {m.room} {m.kind} allocated_tokens={m.allocated_tokens} for {len(m.blocks)} blocks"
                )
            if m.kind == "resume":
                total = self.outcomes[m.room].total_tokens
                if m.sent_tokens % b or not 0 < m.sent_tokens < total:
                    found.append(f"I3: room {m.room} resume at S={m.sent_tokens} (B={b}, T={total})")
                if m.sent_tokens <= last_sent.get(m.room, 0):
                    found.append(f"I4: room {m.room} resumed twice at S={m.sent_tokens}")
                last_sent[m.room] = m.sent_tokens
        return found

    def _ownership(self) -> list[str]:
        """I5 (and I11's blocks) over the allocator and the requests that hold blocks now."""
        found = []
        allocator = self.world.allocator
        if allocator.free_count + allocator.owned_count + allocator.fenced_count != allocator.num_blocks:
            found.append("I5: free + owned + fenced != pool size")
        if allocator.rejected_frees:
            found.append(f"I5: {allocator.rejected_frees} double or foreign frees")
        holders = {r.room: r for r in self.world.queue}
        owners = allocator.owners()
        for room, blocks in owners.items():
            request = holders.get(room)
            if request is None or request.state is State.FAILED or set(request.blocks) != set(blocks):
                found.append(f"I5: blocks {list(blocks)} owned by room {room}, which holds {request!r}")
        fences = allocator.fences()
        for room, blocks in fences.items():
            request = holders.get(room)
            if request is None or request.state is not State.FAILED or set(request.fenced) != set(blocks):
                found.append(f"I5: blocks {list(blocks)} fenced for room {room}, which holds {request!r}")
        for room, request in holders.items():
            if request.fenced and room not in fences:
                found.append(f"I5: room {room} fences {list(request.fenced)}, which the allocator does not")
            if request.warmup and (request.blocks or room in owners):
                found.append(f"I11: warm-up room {room} holds blocks {list(request.blocks)}")
            if request.blocks and room not in owners:
                found.append(f"I5: room {room} holds {list(request.blocks)}, which the allocator says it does not own")
        return found
