"""The receiver controller (fsm.ReceiverQueue and ReceiverRequest) driven through pure-Python fake ports.

These tests pin down the protocol the Language side must follow, with nothing but the pure core and three
tiny fakes written here: no torch, no adapters. They check the paths a request takes (no resume, one
resume, waiting for blocks), every cell of the spec's poll table, the typed failures (corrupt aux, size
mismatch, a pool too small, aborts) and what every failure must leave behind (blocks freed exactly once,
the sender told, the other requests unharmed), and the read discipline: the pool is read only inside a
transition that grants it, the aux row only once, and the per-poll fast path calls no trigger at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from epd_receiver.fsm import (
    LINK_ERROR,
    UNKNOWN_STATUS,
    Aborted,
    AuxRow,
    ContractError,
    CorruptAux,
    DuplicateRoom,
    IntegrityError,
    KVPoll,
    OwnershipError,
    PoolTooSmall,
    ProtocolViolation,
    RankDisagreement,
    RankDivergence,
    ReadOutsideWindow,
    ReceiverConfig,
    ReceiverError,
    ReceiverQueue,
    ReceiverRequest,
    Room,
    SenderFailed,
    SizeMismatch,
    State,
    TimedOut,
    TransportFailed,
    UnknownRoom,
    load_spec,
)

SPEC = load_spec()
NON_TERMINAL = [s for s in State if s not in SPEC.terminal]
HOG: Room = -1  # the owner the tests give every free block to, so that no allocation can succeed

# ---- fake ports -------------------------------------------------------------------------------------


@dataclass
class FakePayload:
    """The assembled output: for each token, the pool block it was gathered from (None until gathered)."""

    total_tokens: int
    mrope_delta: int
    sources: list[int | None]


class FakeBuffers:
    """The BlockBuffers port: aux rows from a dict the test controls; every read is recorded."""

    def __init__(self, block_size: int) -> None:
        self._block_size = block_size
        self.aux: dict[int, AuxRow] = {}
        self.aux_reads: list[int] = []
        self.gathers: list[tuple[tuple[int, ...], int, int]] = []
        self.payloads: list[FakePayload] = []

    @property
    def block_size(self) -> int:
        return self._block_size

    def read_aux(self, block: int) -> AuxRow:
        self.aux_reads.append(block)
        return self.aux.get(block, AuxRow(0, 0))  # a never-written row reads as zeros, as a fresh pool does

    def new_payload(self, total_tokens: int, mrope_delta: int) -> FakePayload:
        payload = FakePayload(total_tokens, mrope_delta, [None] * total_tokens)
        self.payloads.append(payload)
        return payload

    def checksum(self, payload: FakePayload) -> int:
        return hash(tuple(payload.sources)) & 0xFFFFFFFF

    def gather(self, blocks: Sequence[int], tokens: int, into: FakePayload, at: int) -> None:
        self.gathers.append((tuple(blocks), tokens, at))
        assert tokens <= len(blocks) * self._block_size, "more tokens than the blocks hold"
        assert at >= 0 and at + tokens <= into.total_tokens, "gather outside the payload"
        for i in range(tokens):
            into.sources[at + i] = blocks[i // self._block_size]


class FakeAllocator:
    """The BlockAllocator port: FIFO free list, all-or-nothing, an owner per block, loud on a bad free."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self._num_blocks = num_blocks
        self._block_size = block_size
        self.free_list: list[int] = list(range(num_blocks))
        self.owner: dict[int, Room] = {}
        self.fenced: dict[int, Room] = {}
        self.allocs: list[tuple[Room, tuple[int, ...]]] = []
        self.frees: list[tuple[Room, tuple[int, ...]]] = []

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def free_count(self) -> int:
        return len(self.free_list)

    def alloc(self, owner: Room, tokens: int) -> tuple[int, ...] | None:
        needed = -(-tokens // self._block_size)
        if needed > len(self.free_list):
            return None
        blocks = tuple(self.free_list[:needed])
        del self.free_list[:needed]
        for block in blocks:
            self.owner[block] = owner
        self.allocs.append((owner, blocks))
        return blocks

    def free(self, owner: Room, blocks: Sequence[int]) -> None:
        self._take(self.owner, owner, blocks)
        self.free_list.extend(blocks)
        self.frees.append((owner, tuple(blocks)))

    def fence(self, owner: Room, blocks: Sequence[int]) -> None:
        self._take(self.owner, owner, blocks)
        self.fenced.update(dict.fromkeys(blocks, owner))

    def unfence(self, owner: Room, blocks: Sequence[int]) -> None:
        self._take(self.fenced, owner, blocks)
        self.free_list.extend(blocks)
        self.frees.append((owner, tuple(blocks)))

    @staticmethod
    def _take(holders: dict[int, Room], owner: Room, blocks: Sequence[int]) -> None:
        if len(set(blocks)) != len(blocks) or any(holders.get(b) != owner for b in blocks):
            raise OwnershipError(f"room {owner} gives back {list(blocks)}; holders: {[holders.get(b) for b in blocks]}")
        for block in blocks:
            del holders[block]

    def fenced_by(self, owner: Room) -> tuple[int, ...]:
        return tuple(sorted(b for b, o in self.fenced.items() if o == owner))

    def owned_by(self, owner: Room) -> tuple[int, ...]:
        return tuple(sorted(b for b, o in self.owner.items() if o == owner))

    def blocks_allocated_to(self, owner: Room) -> list[int]:
        return sorted(b for o, blocks in self.allocs if o == owner for b in blocks)

    def blocks_freed_by(self, owner: Room) -> list[int]:
        return sorted(b for o, blocks in self.frees if o == owner for b in blocks)

    def hog(self) -> None:
        """Give every free block to an outside owner: the next allocation pass can grant nothing."""
        assert self.alloc(HOG, len(self.free_list) * self._block_size) is not None


class FakeLink:
    """The TransportLink port: polls the value the test sets; records what the receiver sent."""

    def __init__(self, status: int = KVPoll.Bootstrapping) -> None:
        self.status = int(status)
        self.inits: list[tuple[tuple[int, ...], int]] = []
        self.resumes: list[tuple[tuple[int, ...], int, int]] = []
        self.aborts = 0
        self.acknowledged = False

    def poll(self) -> int:
        return self.status

    def init(self, blocks: Sequence[int], allocated_tokens: int) -> None:
        self.inits.append((tuple(blocks), allocated_tokens))

    def resume(self, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None:
        self.resumes.append((tuple(blocks), sent_tokens, allocated_tokens))

    def abort(self) -> None:
        self.aborts += 1

    def writes_stopped(self) -> bool:
        """The status the test sets stands for what the remote side reported."""
        return self.acknowledged or self.status in (KVPoll.Failed, KVPoll.Success)

    def sent(self) -> tuple[int, int, int]:
        return len(self.inits), len(self.resumes), self.aborts


# ---- the bench --------------------------------------------------------------------------------------

B = 4  # block size of the small bench
D = 8  # default allocation: A0 is 2 blocks
POOL = 8  # blocks in the small bench
MAX_T = 1000


@dataclass
class Bench:
    buffers: FakeBuffers
    allocator: FakeAllocator
    queue: ReceiverQueue[FakePayload]
    links: dict[Room, FakeLink] = field(default_factory=dict)

    @classmethod
    def make(
        cls,
        block_size: int = B,
        num_blocks: int = POOL,
        default_alloc: int = D,
        max_total: int = MAX_T,
        clock: Any = None,
        ranks: Any = None,
        **timeouts: Any,
    ) -> Bench:
        buffers = FakeBuffers(block_size)
        allocator = FakeAllocator(num_blocks, block_size)
        config = ReceiverConfig(default_alloc_tokens=default_alloc, max_total_tokens=max_total, **timeouts)
        queue: ReceiverQueue[FakePayload] = ReceiverQueue(buffers, allocator, config, clock=clock, ranks=ranks)
        return cls(buffers, allocator, queue)

    def add(self, room: Room, status: int = KVPoll.WaitingForInput) -> ReceiverRequest[FakePayload]:
        self.links[room] = FakeLink(status)
        return self.queue.add(room, self.links[room])

    def land(self, room: Room, total: int, status: int, mrope_delta: int = 7) -> None:
        """The sender wrote A0 and its aux row (T, delta) into A0[0], then published ``status``."""
        first_block = self.links[room].inits[0][0][0]
        self.buffers.aux[first_block] = AuxRow(total, mrope_delta)
        self.links[room].status = int(status)

    def step(self, times: int = 1) -> list[ReceiverRequest[FakePayload]]:
        ended: list[ReceiverRequest[FakePayload]] = []
        for _ in range(times):
            ended += self.queue.step()
        return ended


def assert_failed_cleanly(bench: Bench, request: ReceiverRequest[FakePayload], error_type: type) -> None:
    """What every failure must leave: a typed error naming the room, nothing held, the sender told once."""
    room = request.room
    assert request.state is State.FAILED
    assert type(request.error) is error_type
    assert isinstance(request.error, ReceiverError)
    assert request.error.room == room
    assert f"room {room}" in str(request.error)
    assert request.blocks == ()
    assert bench.allocator.owned_by(room) == ()
    assert bench.links[room].aborts == 1
    if request.fenced:  # the sender may still be writing: nothing returns to the pool until it stops
        assert bench.allocator.fenced_by(room) == tuple(sorted(request.fenced))
        assert bench.queue.get(room) is request and room in bench.queue.fenced_rooms
        bench.links[room].status = int(KVPoll.Failed)  # a terminal status: the sender has stopped
        bench.step()
        assert request.fenced == () and bench.allocator.fenced_by(room) == ()
    assert bench.allocator.blocks_freed_by(room) == bench.allocator.blocks_allocated_to(room)  # each once
    assert bench.queue.get(room) is None  # retired by the step that ended it (or lifted its fence)


# ---- the no-resume path -----------------------------------------------------------------------------


@pytest.mark.parametrize("total", [1, 6, D])
def test_payload_that_fits_a0_succeeds_with_one_aux_read_and_one_gather(total: int) -> None:
    bench = Bench.make()
    request = bench.add(1)

    bench.step()
    assert request.state is State.TRANSFERRING
    assert bench.links[1].inits == [((0, 1), 2 * B)]
    assert bench.buffers.aux_reads == [] and bench.buffers.gathers == []

    bench.land(1, total, KVPoll.Success)
    ended = bench.step()

    assert ended == [request]
    assert request.state is State.SUCCESS
    assert bench.buffers.aux_reads == [0]
    assert bench.buffers.gathers == [((0, 1), total, 0)]
    assert request.payload is not None and None not in request.payload.sources
    assert (request.payload.total_tokens, request.payload.mrope_delta) == (total, 7)
    assert (request.landed, request.reads, request.resumes) == (total, 1, 0)
    assert bench.links[1].resumes == [] and bench.links[1].aborts == 0


def test_successful_request_holds_its_blocks_until_released_then_frees_them_once() -> None:
    bench = Bench.make()
    request = bench.add(1)
    bench.step()
    bench.land(1, 5, KVPoll.Success)
    bench.step(3)  # a finished request is no longer polled

    assert bench.queue.get(1) is request
    assert bench.allocator.owned_by(1) == (0, 1)
    assert bench.allocator.frees == []

    bench.queue.release(1)

    assert bench.allocator.frees == [(1, (0, 1))]
    assert bench.allocator.owned_by(1) == ()
    assert request.blocks == ()
    assert bench.queue.get(1) is None
    assert len(bench.buffers.gathers) == 1


# ---- the one-resume path ----------------------------------------------------------------------------


def test_long_payload_resumes_once_and_reads_exactly_the_remainder() -> None:
    block, default, total = 128, 8192, 16384
    bench = Bench.make(block_size=block, num_blocks=160, default_alloc=default, max_total=1 << 20)
    request = bench.add(1)
    a0 = tuple(range(64))
    a1 = tuple(range(64, 128))

    bench.step()
    assert bench.links[1].inits == [(a0, 64 * 128)]

    bench.land(1, total, KVPoll.Transferring)
    bench.step()

    assert bench.buffers.aux_reads == [0]
    assert bench.buffers.gathers == [(a0, 8192, 0)]
    assert bench.allocator.frees == [(1, a0)]
    assert bench.links[1].resumes == [(a1, 8192, len(a1) * 128)]  # in the same step: blocks were free
    assert request.state is State.RESUMING
    assert request.blocks == a1

    bench.step(50)  # the status table still says Transferring while the remainder is in flight

    assert request.state is State.RESUMING
    assert bench.buffers.aux_reads == [0]
    assert len(bench.buffers.gathers) == 1
    assert len(bench.links[1].resumes) == 1

    bench.links[1].status = KVPoll.Success
    bench.step()

    assert request.state is State.SUCCESS
    assert bench.buffers.gathers[1:] == [(a1, 8192, 8192)]
    assert bench.buffers.aux_reads == [0]
    assert request.payload is not None
    assert request.payload.sources[: 64 * 128] == [b for b in a0 for _ in range(block)]
    assert request.payload.sources[64 * 128 :] == [b for b in a1 for _ in range(block)]
    assert (request.landed, request.reads, request.resumes) == (total, 2, 1)
    assert bench.links[1].aborts == 0
    assert bench.allocator.owned_by(1) == a1

    bench.queue.release(1)
    assert bench.allocator.owned_by(1) == ()
    assert bench.allocator.blocks_freed_by(1) == bench.allocator.blocks_allocated_to(1)


def test_resume_of_a_partial_last_block_gathers_only_the_tokens_owed() -> None:
    bench = Bench.make()
    request = bench.add(1)
    bench.step()
    bench.land(1, D + 5, KVPoll.Transferring)
    bench.step()
    assert bench.links[1].resumes == [((2, 3), D, 2 * B)]

    bench.links[1].status = KVPoll.Success
    bench.step()

    assert request.state is State.SUCCESS
    assert bench.buffers.gathers == [((0, 1), D, 0), ((2, 3), 5, D)]


# ---- waiting for blocks -----------------------------------------------------------------------------


def test_full_pool_parks_the_remainder_holding_nothing_and_head_of_line_blocks_new_admissions() -> None:
    bench = Bench.make()
    long_request = bench.add(1)  # T = 20: remainder 12 tokens, 3 blocks
    short_request = bench.add(2)
    bench.add(3)
    bench.add(4)
    bench.step()  # four A0s of 2 blocks: the pool is full
    assert bench.allocator.free_list == []

    bench.land(1, D + 12, KVPoll.Transferring)
    bench.land(2, 6, KVPoll.Success)
    bench.step()

    assert long_request.state is State.WAITING_FOR_BLOCKS
    assert long_request.blocks == () and bench.allocator.owned_by(1) == ()
    assert bench.links[1].resumes == []
    assert short_request.state is State.SUCCESS
    assert sorted(bench.allocator.free_list) == [0, 1]  # A0 of room 1: two blocks, three are needed

    newcomer = bench.add(5)
    bench.step()

    assert newcomer.state is State.WAITING_FOR_INPUT  # two blocks would fit it, but room 1 is ahead
    assert bench.links[5].inits == []
    assert long_request.state is State.WAITING_FOR_BLOCKS

    bench.queue.release(2)
    bench.step()

    assert long_request.state is State.RESUMING
    assert bench.links[1].resumes == [((0, 1, 2), D, 3 * B)]
    assert newcomer.state is State.WAITING_FOR_INPUT  # one block left, two needed

    bench.links[1].status = KVPoll.Success
    bench.step()
    assert long_request.state is State.SUCCESS
    assert bench.buffers.gathers[-1] == ((0, 1, 2), 12, D)

    bench.queue.release(1)
    bench.step()
    assert newcomer.state is State.TRANSFERRING
    assert len(bench.links[5].inits) == 1


def test_remainders_are_served_before_admissions_that_arrived_earlier() -> None:
    bench = Bench.make(num_blocks=4)
    early = bench.add(1, KVPoll.Bootstrapping)  # first in the queue, but not ready yet
    resumer = bench.add(2)
    bench.add(3)
    bench.step()  # rooms 2 and 3 take the whole pool
    early_link = bench.links[1]
    early_link.status = KVPoll.WaitingForInput
    bench.step()
    assert early.state is State.WAITING_FOR_INPUT

    bench.land(2, 2 * D, KVPoll.Transferring)  # frees A0 (2 blocks), needs 2 for the remainder
    bench.step()

    assert resumer.state is State.RESUMING
    assert bench.links[2].resumes == [((0, 1), D, 2 * B)]
    assert early.state is State.WAITING_FOR_INPUT
    assert early_link.inits == []


def test_requests_waiting_for_a_remainder_are_served_in_arrival_order() -> None:
    bench = Bench.make(num_blocks=6)
    first = bench.add(1)
    second = bench.add(2)
    bench.add(3)
    bench.step()  # the pool is full: 3 A0s of 2 blocks
    bench.land(1, D + 3 * B, KVPoll.Transferring)  # each needs 3 blocks for its remainder
    bench.land(2, D + 3 * B, KVPoll.Transferring)
    bench.step()  # 4 blocks come back: only one remainder fits

    assert first.state is State.RESUMING
    assert second.state is State.WAITING_FOR_BLOCKS
    assert bench.links[2].resumes == []


def test_remainder_larger_than_the_whole_pool_fails_with_pool_too_small() -> None:
    bench = Bench.make()
    request = bench.add(1)
    bystander = bench.add(2)
    bench.step()
    bench.land(1, D + (POOL + 1) * B, KVPoll.Transferring)  # 9 blocks remain, the pool has 8
    bench.land(2, D, KVPoll.Success)
    bench.step()

    assert_failed_cleanly(bench, request, PoolTooSmall)
    assert bench.links[1].resumes == []
    assert bystander.state is State.SUCCESS


def test_default_allocation_larger_than_the_pool_fails_with_pool_too_small() -> None:
    bench = Bench.make(default_alloc=(POOL + 1) * B)
    request = bench.add(1)
    bench.step()

    assert_failed_cleanly(bench, request, PoolTooSmall)
    assert bench.links[1].inits == []


# ---- the poll table, cell by cell ---------------------------------------------------------------------

SUBJECT: Room = 1
BYSTANDER: Room = 2
PARKED_TOTAL = D + 3 * B  # remainder of 3 blocks: with the pool hogged, it cannot be served
RESUMED_TOTAL = 2 * D  # remainder of 2 blocks: served as soon as A0 comes back


def bench_with_subject_in(state: State, clock: Any = None, **timeouts: float | None) -> Bench:
    """A bench whose subject is in ``state`` and whose bystander is TRANSFERRING; no free block is left."""
    bench = Bench.make(clock=clock, **timeouts)
    bench.add(SUBJECT, KVPoll.Bootstrapping)
    bench.add(BYSTANDER)
    bench.step()  # the bystander takes (0, 1)
    if state is State.WAITING_FOR_INPUT:
        bench.allocator.hog()
    if state is not State.BOOTSTRAPPING:
        bench.links[SUBJECT].status = KVPoll.WaitingForInput
        bench.step()
    if state is State.WAITING_FOR_BLOCKS:
        bench.allocator.hog()
        bench.land(SUBJECT, PARKED_TOTAL, KVPoll.Transferring)
        bench.step()
    if state is State.RESUMING:
        bench.land(SUBJECT, RESUMED_TOTAL, KVPoll.Transferring)
        bench.step()
    if bench.allocator.free_list:
        bench.allocator.hog()
    request = bench.queue.get(SUBJECT)
    assert request is not None and request.state is state
    assert bench.queue.get(BYSTANDER) is not None
    return bench


def expected_dest(state: State, event: str) -> State:
    """Where a (non-warm-up) request goes on ``event``."""
    (transition,) = [t for t in SPEC.transitions_from(state) if t.trigger == event and "is_warmup" not in t.conditions]
    return state if transition.internal else transition.dest


POLL_CELLS = [(state, value) for state, table in SPEC.polls.items() if state not in SPEC.terminal for value in table]


def test_poll_cells_cover_every_non_terminal_state_and_value() -> None:
    assert {state for state, _ in POLL_CELLS} == set(NON_TERMINAL)
    assert len(POLL_CELLS) == len(NON_TERMINAL) * len(KVPoll)


@pytest.mark.parametrize(("state", "value"), POLL_CELLS, ids=[f"{s.name}-{v.name}" for s, v in POLL_CELLS])
def test_poll_cell_behaves_as_the_spec_declares(state: State, value: KVPoll) -> None:
    outcome = SPEC.polls[state][value]
    bench = bench_with_subject_in(state)
    subject = bench.queue.get(SUBJECT)
    bystander = bench.queue.get(BYSTANDER)
    assert subject is not None and bystander is not None
    if outcome.event == "payload_landed" and state is State.TRANSFERRING:
        bench.land(SUBJECT, D, value)  # a Success from A0 carries a T that fits A0
    elif outcome.event == "first_chunk_landed":
        bench.land(SUBJECT, PARKED_TOTAL, value)
    else:
        bench.links[SUBJECT].status = int(value)
    bench.land(BYSTANDER, D, KVPoll.Success)
    sent_before = bench.links[SUBJECT].sent()
    reads_before = subject.reads
    aux_reads_before = list(bench.buffers.aux_reads)
    # a guarded cell is the fast path while its guard does not hold (here: a link without progress)
    noop = outcome.is_noop or (outcome.guard is not None and not getattr(subject, outcome.guard)())

    bench.step()

    assert bystander.state is State.SUCCESS
    if noop:
        assert subject.state is state
        assert bench.links[SUBJECT].sent() == sent_before
        assert subject.reads == reads_before
        assert bench.buffers.aux_reads == [*aux_reads_before, 0]  # the bystander's A0[0] only
    elif outcome.cause is not None:
        assert_failed_cleanly(bench, subject, SPEC.causes[outcome.cause])
        assert f"poll {value.name} in {state.name}" in str(subject.error)
    else:
        assert outcome.event is not None
        assert subject.state is expected_dest(state, outcome.event)
        assert subject.error is None


@pytest.mark.parametrize("state", NON_TERMINAL, ids=[s.name for s in NON_TERMINAL])
@pytest.mark.parametrize("value", [7, 5, -1])
def test_unknown_poll_value_fails_with_protocol_violation(state: State, value: int) -> None:
    bench = bench_with_subject_in(state)
    subject = bench.queue.get(SUBJECT)
    bystander = bench.queue.get(BYSTANDER)
    assert subject is not None and bystander is not None
    bench.links[SUBJECT].status = value
    bench.land(BYSTANDER, D, KVPoll.Success)

    bench.step()

    assert_failed_cleanly(bench, subject, ProtocolViolation)
    assert "not a KVPoll value" in str(subject.error)
    assert bystander.state is State.SUCCESS


# ---- bad input from the sender --------------------------------------------------------------------------


def subject_lands(
    total: int, status: KVPoll
) -> tuple[Bench, ReceiverRequest[FakePayload], ReceiverRequest[FakePayload]]:
    """The subject's first chunk lands claiming ``total`` with ``status``; a bystander succeeds beside it."""
    bench = Bench.make()
    subject = bench.add(SUBJECT)
    bystander = bench.add(BYSTANDER)
    bench.step()
    bench.land(SUBJECT, total, status)
    bench.land(BYSTANDER, D, KVPoll.Success)
    bench.step()
    return bench, subject, bystander


@pytest.mark.parametrize("status", [KVPoll.Transferring, KVPoll.Success], ids=lambda s: s.name)
@pytest.mark.parametrize("total", [0, -1, -(1 << 31), MAX_T + 1])
def test_corrupt_aux_total_fails_with_corrupt_aux(status: KVPoll, total: int) -> None:
    bench, subject, bystander = subject_lands(total, status)

    assert_failed_cleanly(bench, subject, CorruptAux)
    assert subject.payload is None and subject.total_tokens is None
    assert bench.buffers.gathers == [((2, 3), D, 0)]  # the bystander's; nothing of the subject
    assert bench.links[SUBJECT].resumes == []
    assert bystander.state is State.SUCCESS


def test_largest_valid_total_is_not_corrupt() -> None:
    bench = Bench.make(num_blocks=POOL, default_alloc=D, max_total=D)
    request = bench.add(1)
    bench.step()
    bench.land(1, D, KVPoll.Success)
    bench.step()
    assert request.state is State.SUCCESS


@pytest.mark.parametrize(
    ("status", "total"),
    [(KVPoll.Transferring, t) for t in (1, D - 1, D)] + [(KVPoll.Success, t) for t in (D + 1, 3 * D)],
    ids=[
        "transferring-but-fits-1",
        "transferring-but-fits-D-1",
        "transferring-but-fits-D",
        "success-beyond-a0-D+1",
        "success-beyond-a0-3D",
    ],
)
def test_a_total_that_contradicts_the_status_fails_with_size_mismatch(status: KVPoll, total: int) -> None:
    """Transferring promises T > |A0|*B; Success from A0 promises T <= |A0|*B. Either lie fails closed."""
    bench, subject, bystander = subject_lands(total, status)

    assert_failed_cleanly(bench, subject, SizeMismatch)
    assert bench.buffers.gathers == [((2, 3), D, 0)]  # only the bystander's payload was read
    assert bench.links[SUBJECT].resumes == []
    assert bystander.state is State.SUCCESS


def test_sender_failure_mid_resume_frees_the_remainder_blocks() -> None:
    bench = bench_with_subject_in(State.RESUMING)
    subject = bench.queue.get(SUBJECT)
    assert subject is not None
    a1 = subject.blocks
    assert a1
    bench.links[SUBJECT].status = KVPoll.Failed

    bench.step()

    assert_failed_cleanly(bench, subject, SenderFailed)
    assert bench.allocator.frees[-1] == (SUBJECT, a1)


class RaisingLink(FakeLink):
    """A link whose init or resume reports a typed failure, as a transport that lost its peer would."""

    def __init__(self, fail_on: str) -> None:
        super().__init__(KVPoll.WaitingForInput)
        self.fail_on = fail_on

    def init(self, blocks: Sequence[int], allocated_tokens: int) -> None:
        super().init(blocks, allocated_tokens)
        if self.fail_on == "init":
            raise SenderFailed(SUBJECT, "init could not be sent")

    def resume(self, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None:
        super().resume(blocks, sent_tokens, allocated_tokens)
        if self.fail_on == "resume":
            raise SenderFailed(SUBJECT, "resume could not be sent")


@pytest.mark.parametrize("fail_on", ["init", "resume"])
def test_typed_error_from_a_port_during_an_action_fails_only_that_request_and_frees_its_blocks(fail_on: str) -> None:
    bench = Bench.make()
    bench.links[SUBJECT] = RaisingLink(fail_on)
    subject = bench.queue.add(SUBJECT, bench.links[SUBJECT])
    bystander = bench.add(BYSTANDER)
    bench.step()
    if fail_on == "resume":
        bench.land(SUBJECT, RESUMED_TOTAL, KVPoll.Transferring)
        bench.land(BYSTANDER, D, KVPoll.Success)
        bench.step()
    else:
        bench.land(BYSTANDER, D, KVPoll.Success)
        bench.step()

    assert_failed_cleanly(bench, subject, SenderFailed)
    assert bystander.state is State.SUCCESS


class BrokenLink(FakeLink):
    """A link whose socket died: the operation named raises a plain ConnectionError."""

    def __init__(self, broken: str) -> None:
        super().__init__(KVPoll.WaitingForInput)
        self.broken = broken

    def poll(self) -> int:
        if self.broken == "poll" and self.inits:
            raise ConnectionError("peer reset")
        return super().poll()

    def init(self, blocks: Sequence[int], allocated_tokens: int) -> None:
        super().init(blocks, allocated_tokens)
        if self.broken == "init":
            raise ConnectionError("peer reset")

    def resume(self, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None:
        super().resume(blocks, sent_tokens, allocated_tokens)
        if self.broken == "resume":
            raise ConnectionError("peer reset")


@pytest.mark.parametrize("broken", ["init", "resume", "poll"])
def test_a_link_that_raises_fails_only_that_request_with_transport_failed_and_fences_its_blocks(broken: str) -> None:
    """Whether the sender stopped writing is unknown after a link error: the blocks stay out of the pool."""
    bench = Bench.make()
    bench.links[SUBJECT] = BrokenLink(broken)
    subject = bench.queue.add(SUBJECT, bench.links[SUBJECT])
    bystander = bench.add(BYSTANDER)
    bench.step()
    if broken == "resume":
        bench.land(SUBJECT, RESUMED_TOTAL, KVPoll.Transferring)
        bench.step()
    held = subject.blocks
    assert held and subject.state is not State.FAILED  # the error surfaces at the next poll, on every rank
    bench.land(BYSTANDER, D, KVPoll.Success)
    bench.step()

    assert type(subject.error) is TransportFailed
    assert "peer reset" in str(subject.error)
    assert subject.fenced == held and bench.allocator.fenced_by(SUBJECT) == tuple(sorted(held))
    assert bystander.state is State.SUCCESS
    assert_failed_cleanly(bench, subject, TransportFailed)


# ---- client aborts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("state", NON_TERMINAL, ids=[s.name for s in NON_TERMINAL])
def test_abort_in_every_non_terminal_state_fails_cleanly(state: State) -> None:
    bench = bench_with_subject_in(state)
    subject = bench.queue.get(SUBJECT)
    bystander = bench.queue.get(BYSTANDER)
    assert subject is not None and bystander is not None

    assert bench.queue.abort(SUBJECT) is True
    assert subject.state is State.FAILED
    assert bench.queue.abort(SUBJECT) is False  # already over

    bench.land(BYSTANDER, D, KVPoll.Success)
    ended = bench.step()

    assert subject in ended
    assert_failed_cleanly(bench, subject, Aborted)
    assert bystander.state is State.SUCCESS


def test_abort_of_a_finished_or_unknown_request_does_nothing() -> None:
    bench = Bench.make()
    request = bench.add(1)
    bench.step()
    bench.land(1, D, KVPoll.Success)
    bench.step()

    assert bench.queue.abort(1) is False
    assert bench.queue.abort(99) is False
    assert request.state is State.SUCCESS
    assert bench.allocator.owned_by(1) == (0, 1)
    assert bench.links[1].aborts == 0


# ---- fencing (#23) ------------------------------------------------------------------------------------

WRITING = [State.TRANSFERRING, State.RESUMING]  # an init or resume is out: the sender may be writing


def aborted_while_writing(state: State, clock: Any = None, **timeouts: float | None) -> tuple[Bench, Any]:
    bench = bench_with_subject_in(state, clock=clock, **timeouts)
    subject = bench.queue.get(SUBJECT)
    assert subject is not None
    held = subject.blocks
    assert bench.queue.abort(SUBJECT)
    assert subject.fenced == held and subject.blocks == ()
    assert bench.allocator.fenced_by(SUBJECT) == tuple(sorted(held))
    assert not set(held) & set(bench.allocator.free_list)
    assert bench.links[SUBJECT].aborts == 1  # the sender is told at once
    return bench, subject


@pytest.mark.parametrize("state", WRITING, ids=lambda s: s.name)
@pytest.mark.parametrize("stop", [KVPoll.Failed, KVPoll.Success], ids=lambda s: s.name)
def test_blocks_of_a_request_failed_mid_write_stay_fenced_until_a_terminal_status(state: State, stop: KVPoll) -> None:
    bench, subject = aborted_while_writing(state)
    fenced = subject.fenced
    bench.land(BYSTANDER, D, KVPoll.Success)
    newcomer = bench.add(3)
    for status in (KVPoll.WaitingForInput, KVPoll.Transferring, KVPoll.Bootstrapping, 7):
        bench.links[SUBJECT].status = int(status)  # still writing, or nonsense: the fence holds
        bench.step()
        assert subject.fenced == fenced and bench.queue.get(SUBJECT) is subject
    bench.queue.release(BYSTANDER)  # the bystander's blocks come back, the fenced ones do not
    bench.step()
    assert not set(newcomer.blocks) & set(fenced)

    bench.links[SUBJECT].status = int(stop)
    bench.step()

    assert subject.fenced == () and subject.state is State.FAILED and type(subject.error) is Aborted
    assert bench.allocator.fenced_by(SUBJECT) == () and bench.allocator.owned_by(SUBJECT) == ()
    assert bench.allocator.blocks_freed_by(SUBJECT) == bench.allocator.blocks_allocated_to(SUBJECT)
    assert bench.queue.get(SUBJECT) is None and SUBJECT not in bench.queue.fenced_rooms
    assert bench.links[SUBJECT].aborts == 1


@pytest.mark.parametrize("state", WRITING, ids=lambda s: s.name)
def test_an_acknowledged_abort_lifts_the_fence(state: State) -> None:
    bench, subject = aborted_while_writing(state)
    bench.links[SUBJECT].status = int(KVPoll.Transferring)
    bench.step()
    assert subject.fenced != ()

    bench.links[SUBJECT].acknowledged = True
    bench.step()

    assert subject.fenced == () and bench.queue.get(SUBJECT) is None


@pytest.mark.parametrize("state", WRITING, ids=lambda s: s.name)
def test_a_silent_sender_is_presumed_gone_after_the_drain_deadline(state: State) -> None:
    clock = FakeClock()
    bench, subject = aborted_while_writing(state, clock, drain_timeout_s=5.0)
    bench.links[SUBJECT].status = int(KVPoll.Transferring)
    clock.t += 5.0
    bench.step()
    assert subject.fenced != ()  # not past it yet

    clock.t += 0.5
    bench.step()

    assert subject.fenced == () and bench.queue.get(SUBJECT) is None
    assert bench.allocator.blocks_freed_by(SUBJECT) == bench.allocator.blocks_allocated_to(SUBJECT)
    assert type(subject.error) is Aborted  # the drain changes the pool, not the outcome


class ConcludingLink(FakeLink):
    """A link that folds its own conclusions into poll(), as SGLang's receiver does: its abort() turns
    poll() to Failed locally and tells the sender nothing, and a terminal status latches. ``status`` is
    what the remote side reported; only that is evidence."""

    def __init__(self, status: int = KVPoll.WaitingForInput) -> None:
        super().__init__(status)
        self.concluded: int | None = None

    def poll(self) -> int:
        if self.concluded is None and self.status in (KVPoll.Failed, KVPoll.Success):
            self.concluded = self.status
        return self.status if self.concluded is None else self.concluded

    def abort(self) -> None:
        super().abort()
        self.concluded = int(KVPoll.Failed)


def concluding_bench(state: State, clock: Any = None, **timeouts: float | None) -> tuple[Bench, Any]:
    bench = Bench.make(clock=clock, **timeouts)
    bench.links[SUBJECT] = ConcludingLink()
    subject = bench.queue.add(SUBJECT, bench.links[SUBJECT])
    bench.step()
    if state is State.RESUMING:
        bench.land(SUBJECT, RESUMED_TOTAL, KVPoll.Transferring)
        bench.step(2)
    assert subject.state is state
    return bench, subject


@pytest.mark.parametrize("state", WRITING, ids=lambda s: s.name)
@pytest.mark.parametrize("ending", ["abort", "timeout"])
def test_a_failed_that_our_own_side_concluded_never_lifts_a_fence(state: State, ending: str) -> None:
    clock = FakeClock()
    bench, subject = concluding_bench(
        state, clock, transfer_timeout_s=10.0, resume_timeout_s=10.0, drain_timeout_s=30.0
    )
    held = subject.blocks
    if ending == "abort":
        bench.queue.abort(SUBJECT)
    else:
        clock.t += 10.5
        bench.step()
    assert bench.links[SUBJECT].poll() == KVPoll.Failed  # what the link now says, of its own accord
    newcomer = bench.add(3)
    bench.step(5)

    assert subject.fenced == held and not set(newcomer.blocks) & set(held)  # the late write has nowhere to land
    bench.links[SUBJECT].status = int(KVPoll.Success)  # the remote side finished its write: evidence
    bench.step()
    assert subject.fenced == () and bench.queue.get(SUBJECT) is None


def test_a_fence_of_a_sender_that_never_hears_of_the_abort_lifts_at_the_drain_deadline() -> None:
    clock = FakeClock()
    bench, subject = concluding_bench(State.TRANSFERRING, clock, drain_timeout_s=30.0)
    bench.queue.abort(SUBJECT)
    bench.links[SUBJECT].status = int(KVPoll.Transferring)  # its chunk landed; it waits for a resume forever
    clock.t += 29.0
    bench.step()
    assert subject.fenced != ()
    clock.t += 1.5
    bench.step()
    assert subject.fenced == () and type(subject.error) is Aborted


def test_without_a_drain_deadline_a_silent_sender_keeps_its_fence() -> None:
    clock = FakeClock()
    bench, subject = aborted_while_writing(State.TRANSFERRING, clock, drain_timeout_s=None)
    clock.t += 1e9
    bench.step(3)
    assert subject.fenced != ()


@pytest.mark.parametrize("state", [s for s in NON_TERMINAL if s not in WRITING], ids=lambda s: s.name)
def test_a_request_that_holds_nothing_the_sender_writes_is_retired_at_once(state: State) -> None:
    bench = bench_with_subject_in(state)
    bench.queue.abort(SUBJECT)
    bench.step()
    assert bench.queue.get(SUBJECT) is None and bench.allocator.fenced == {}


@pytest.mark.parametrize("state", WRITING, ids=lambda s: s.name)
def test_a_sender_that_reported_failed_has_stopped_so_nothing_is_fenced(state: State) -> None:
    bench = bench_with_subject_in(state)
    subject = bench.queue.get(SUBJECT)
    assert subject is not None
    bench.links[SUBJECT].status = int(KVPoll.Failed)
    bench.step()
    assert subject.state is State.FAILED and subject.fenced == () and bench.allocator.fenced == {}
    assert bench.queue.get(SUBJECT) is None


def test_bad_data_behind_a_success_frees_at_once_the_sender_is_done() -> None:
    bench, subject, _ = subject_lands(D + 1, KVPoll.Success)  # T beyond A0, yet Success
    assert type(subject.error) is SizeMismatch
    assert subject.fenced == () and bench.allocator.fenced == {} and bench.queue.get(SUBJECT) is None


def test_bad_data_behind_a_transferring_is_fenced_the_sender_may_still_write() -> None:
    bench, subject, _ = subject_lands(0, KVPoll.Transferring)
    assert type(subject.error) is CorruptAux
    assert subject.fenced == (0, 1) and bench.queue.get(SUBJECT) is subject


def test_a_fenced_room_cannot_be_added_again_until_its_fence_lifts() -> None:
    bench, _ = aborted_while_writing(State.TRANSFERRING)
    bench.step()
    with pytest.raises(ValueError, match="already in the queue"):
        bench.queue.add(SUBJECT, FakeLink())
    bench.links[SUBJECT].status = int(KVPoll.Failed)
    bench.step()
    bench.add(SUBJECT)


# ---- the read discipline (I1, I2) --------------------------------------------------------------------


@pytest.mark.parametrize("state", [State.TRANSFERRING, State.RESUMING], ids=lambda s: s.name)
def test_reading_the_pool_between_steps_raises_read_outside_window(state: State) -> None:
    bench = bench_with_subject_in(state)
    subject = bench.queue.get(SUBJECT)
    assert subject is not None and subject.first_block is not None
    aux_reads, gathers = list(bench.buffers.aux_reads), list(bench.buffers.gathers)
    scratch = FakePayload(64, 0, [None] * 64)

    with pytest.raises(ReadOutsideWindow):
        subject._window.gather(subject.blocks, B, scratch, 0)
    if state is State.TRANSFERRING:
        with pytest.raises(ReadOutsideWindow):
            subject._window.read_aux(subject.first_block)

    assert bench.buffers.aux_reads == aux_reads
    assert bench.buffers.gathers == gathers


def test_reading_a_finished_payload_blocks_raises_read_outside_window() -> None:
    bench = Bench.make()
    request = bench.add(1)
    bench.step()
    bench.land(1, D, KVPoll.Success)
    bench.step()
    assert request.payload is not None

    with pytest.raises(ReadOutsideWindow):
        request._window.gather(request.blocks, D, request.payload, 0)
    with pytest.raises(ReadOutsideWindow):
        request._window.read_aux(0)
    assert len(bench.buffers.gathers) == 1 and bench.buffers.aux_reads == [0]


def test_second_aux_read_raises_even_with_the_window_open() -> None:
    bench = Bench.make()
    request = bench.add(1)
    bench.step()
    bench.land(1, RESUMED_TOTAL, KVPoll.Transferring)
    bench.step()
    assert request.state is State.RESUMING and request.first_block == 0

    request._window.grant_aux(request.first_block)  # as if a transition opened it again
    with pytest.raises(ReadOutsideWindow, match="second time"):
        request._window.read_aux(request.first_block)
    assert bench.buffers.aux_reads == [0]


def test_an_open_data_window_grants_only_the_current_allocation_and_its_capacity() -> None:
    bench = Bench.make()
    request = bench.add(1)
    bench.step()
    assert request.blocks == (0, 1)
    payload = bench.buffers.new_payload(2 * B, 0)

    request._window.grant_data(request.blocks)  # as a transition with reads = ["data"] does
    with pytest.raises(ReadOutsideWindow, match="granted"):
        request._window.gather((0, 2), B, payload, 0)  # a block that is not this allocation's
    with pytest.raises(ReadOutsideWindow, match="granted"):
        request._window.gather((1, 0), B, payload, 0)  # the right blocks, in the wrong order
    with pytest.raises(ReadOutsideWindow, match="tokens"):
        request._window.gather((0, 1), 2 * B + 1, payload, 0)  # more than they hold
    request._window.gather((0, 1), 2 * B, payload, 0)
    assert bench.buffers.gathers == [((0, 1), 2 * B, 0)]


class RereadsAux(ReceiverRequest[FakePayload]):
    """A faulty controller that reads the aux row again while gathering the first chunk."""

    def gather_landed(self, event: Any) -> None:
        assert self.first_block is not None
        self._window.read_aux(self.first_block)
        super().gather_landed(event)


def test_controller_reading_aux_twice_in_one_transition_raises_and_is_not_a_failed_request() -> None:
    buffers = FakeBuffers(B)
    allocator = FakeAllocator(POOL, B)
    queue: ReceiverQueue[FakePayload] = ReceiverQueue(
        buffers, allocator, ReceiverConfig(D, MAX_T), request_class=RereadsAux
    )
    link = FakeLink(KVPoll.WaitingForInput)
    request = queue.add(1, link)
    queue.step()
    buffers.aux[0] = AuxRow(D, 0)
    link.status = KVPoll.Success

    with pytest.raises(ReadOutsideWindow):
        queue.step()

    assert buffers.aux_reads == [0]  # the second read never reached the pool
    assert buffers.gathers == []
    assert request.state is State.TRANSFERRING  # a ContractError is a bug, not a failed request
    assert request.error is None
    with pytest.raises(ReadOutsideWindow):  # and the window closed behind the failed transition
        request._window.gather(request.blocks, D, FakePayload(D, 0, [None] * D), 0)


def test_double_free_is_a_contract_error_not_a_failed_request() -> None:
    bench = Bench.make()
    request = bench.add(1)
    bench.step()
    bench.allocator.free(1, request.blocks)  # someone else returned the blocks behind its back

    with pytest.raises(ContractError):
        bench.queue.abort(1)


# ---- the per-poll fast path -----------------------------------------------------------------------------


def test_noop_polls_call_no_trigger(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = bench_with_subject_in(State.RESUMING)
    subject = bench.queue.get(SUBJECT)
    assert subject is not None
    calls: list[tuple[Any, ...]] = []
    real_trigger: Callable[..., bool] = subject.trigger

    def spy(*args: Any, **kwargs: Any) -> bool:
        calls.append(args)
        return real_trigger(*args, **kwargs)

    monkeypatch.setattr(subject, "trigger", spy)
    bench.links[SUBJECT].status = KVPoll.Transferring

    bench.step(100)

    assert calls == []
    assert subject.state is State.RESUMING

    bench.links[SUBJECT].status = KVPoll.Success
    bench.step()
    assert calls == [("payload_landed",)]  # the spy does see a real event
    assert subject.state is State.SUCCESS


# ---- deadlines --------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


DEADLINES = {
    State.BOOTSTRAPPING: "bootstrap_timeout_s",
    State.WAITING_FOR_INPUT: "admission_timeout_s",
    State.TRANSFERRING: "transfer_timeout_s",
    State.WAITING_FOR_BLOCKS: "blocks_timeout_s",
    State.RESUMING: "resume_timeout_s",
}


def test_every_waiting_state_has_a_deadline_in_the_spec() -> None:
    assert {state: t.field for state, t in SPEC.timeouts.items() if t.cause == "timeout"} == DEADLINES
    assert SPEC.timeouts[State.FAILED].event == "drain_expired"  # a fence ends, the request stays FAILED


@pytest.mark.parametrize("state", list(DEADLINES), ids=[s.name for s in DEADLINES])
def test_a_request_that_overstays_its_state_times_out_and_frees_what_it_holds(state: State) -> None:
    clock = FakeClock()
    bench = bench_with_subject_in(state, clock=clock, **{DEADLINES[state]: 10.0})
    subject = bench.queue.get(SUBJECT)
    assert subject is not None and subject.state is state

    clock.t += 10.0
    bench.step()
    assert subject.state is state, "exactly at the deadline is still in time"

    clock.t += 0.5
    bench.step()
    assert_failed_cleanly(bench, subject, TimedOut)
    assert "10 s" in str(subject.error)


def test_a_status_that_arrived_in_time_wins_over_the_deadline() -> None:
    clock = FakeClock()
    bench = bench_with_subject_in(State.TRANSFERRING, clock=clock, transfer_timeout_s=10.0)
    clock.t += 11.0
    bench.land(SUBJECT, D, KVPoll.Success)  # the status was there when this iteration polled
    bench.step()
    assert bench.queue.get(SUBJECT).state is State.SUCCESS  # type: ignore[union-attr]


def test_states_without_a_deadline_wait_forever() -> None:
    clock = FakeClock()
    bench = bench_with_subject_in(State.WAITING_FOR_BLOCKS, clock=clock, blocks_timeout_s=None)
    clock.t += 1e9
    bench.step()
    assert bench.queue.get(SUBJECT).state is State.WAITING_FOR_BLOCKS  # type: ignore[union-attr]


# ---- several resume rounds (links that report progress) ---------------------------------------------


class ProgressLink(FakeLink):
    """A link whose sender also reports the tokens landed so far."""

    def __init__(self, status: int = KVPoll.WaitingForInput) -> None:
        super().__init__(status)
        self.landed = 0

    def landed_tokens(self) -> int:
        return self.landed


def progress_bench(total: int) -> tuple[Bench, ProgressLink, ReceiverRequest[FakePayload]]:
    """Pool of 3 blocks of 4 (A0 = 2 blocks); the subject's first chunk of 8 has landed and been read."""
    bench = Bench.make(num_blocks=3)
    link = ProgressLink()
    bench.links[SUBJECT] = link
    request = bench.queue.add(SUBJECT, link)
    bench.step()
    bench.land(SUBJECT, total, KVPoll.Transferring)
    link.landed = 8
    bench.step()
    assert request.state is State.RESUMING and request.capacity == 12
    return bench, link, request


def test_with_progress_a_payload_larger_than_the_pool_arrives_in_rounds_each_read_once() -> None:
    bench, link, request = progress_bench(total=30)
    assert link.inits == [((0, 1), 8)]
    assert link.resumes == [((2, 0, 1), 8, 12)]  # every free block, fewer than the remainder of 22

    bench.step(3)  # Transferring, nothing new landed: the fast path
    assert request.reads == 1 and len(link.resumes) == 1
    link.landed = 20  # round 1 is full
    bench.step()
    assert link.resumes[-1] == ((2, 0, 1), 20, 12)  # read, freed (FIFO hands them back), resumed at S=20
    assert request.reads == 2

    link.landed, link.status = 30, KVPoll.Success  # the last round ends the transfer
    bench.step()

    assert request.state is State.SUCCESS
    assert request.landed == 30 and request.payload is not None and None not in request.payload.sources
    assert [g[1:] for g in bench.buffers.gathers] == [(8, 0), (12, 8), (10, 20)]
    assert request.reads == 3


@pytest.mark.parametrize("landed", [9, 19])
def test_a_round_still_in_flight_is_not_read(landed: int) -> None:
    bench, link, request = progress_bench(total=30)
    link.landed = landed
    bench.step()
    assert request.state is State.RESUMING and request.reads == 1 and len(link.resumes) == 1


@pytest.mark.parametrize("landed", [21, 29])
def test_a_landed_count_beyond_the_round_fails_with_size_mismatch(landed: int) -> None:
    bench, link, request = progress_bench(total=30)
    link.landed = landed  # a full round lands exactly 8 + 12 = 20
    bench.step()
    assert_failed_cleanly(bench, request, SizeMismatch)


def test_a_success_whose_landed_count_is_not_t_fails_with_size_mismatch() -> None:
    bench = Bench.make()
    link = ProgressLink()
    bench.links[SUBJECT] = link
    subject = bench.queue.add(SUBJECT, link)
    bench.step()
    bench.land(SUBJECT, 6, KVPoll.Success)
    link.landed = 5
    bench.step()
    assert_failed_cleanly(bench, subject, SizeMismatch)


def test_without_progress_a_remainder_beyond_the_pool_fails_instead_of_waiting() -> None:
    bench = Bench.make(num_blocks=3)
    subject = bench.add(SUBJECT)
    bench.step()
    bench.land(SUBJECT, 30, KVPoll.Transferring)
    bench.step()
    assert_failed_cleanly(bench, subject, PoolTooSmall)


# ---- integrity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("resumed", [False, True])
def test_a_payload_that_does_not_match_the_senders_checksum_fails_closed(resumed: bool) -> None:
    bench = Bench.make()
    subject = bench.add(SUBJECT)
    bystander = bench.add(BYSTANDER)
    bench.step()
    total = RESUMED_TOTAL if resumed else D
    first_block = bench.links[SUBJECT].inits[0][0][0]
    bench.buffers.aux[first_block] = AuxRow(total, 7, checksum=0xDEADBEEF)  # not what will be assembled
    bench.links[SUBJECT].status = KVPoll.Transferring if resumed else KVPoll.Success
    bench.land(BYSTANDER, D, KVPoll.Success)
    bench.step()
    if resumed:
        bench.links[SUBJECT].status = KVPoll.Success
        bench.step()

    assert_failed_cleanly(bench, subject, IntegrityError)
    assert "0xdeadbeef" in str(subject.error)
    assert bystander.state is State.SUCCESS


def test_a_payload_that_matches_the_senders_checksum_succeeds() -> None:
    bench = Bench.make()
    request = bench.add(1)
    bench.step()
    expected = bench.buffers.checksum(FakePayload(D, 7, [0] * 4 + [1] * 4))  # what gathering A0 = (0, 1) yields
    bench.buffers.aux[0] = AuxRow(D, 7, checksum=expected)
    bench.links[1].status = KVPoll.Success
    bench.step()
    assert request.state is State.SUCCESS and request.checksum == expected


# ---- the allocation pass, configuration and strictness ----------------------------------------------


def test_a_request_too_large_for_the_pool_does_not_hold_back_the_ones_behind_it() -> None:
    bench = Bench.make(default_alloc=POOL * B + 1)  # every default allocation exceeds the pool
    too_large = bench.add(SUBJECT)
    warmup = bench.queue.add(BYSTANDER, FakeLink(KVPoll.WaitingForInput), warmup=True)
    bench.step()
    assert too_large.state is State.FAILED and isinstance(too_large.error, PoolTooSmall)
    assert warmup.state is State.TRANSFERRING  # admitted in the same pass, after the failure


def test_a_warm_up_request_takes_no_blocks_and_does_not_hold_back_the_ones_behind_it() -> None:
    bench = Bench.make()
    bench.allocator.hog()
    bench.allocator.free(HOG, (0, 1))  # exactly one A0 is free
    warmup = bench.queue.add(SUBJECT, FakeLink(KVPoll.WaitingForInput), warmup=True)
    real = bench.add(BYSTANDER)
    bench.step()
    assert warmup.state is State.TRANSFERRING and warmup.blocks == () and bench.links.get(SUBJECT) is None
    assert real.state is State.TRANSFERRING and real.blocks == (0, 1)  # same iteration
    bench.buffers.aux.clear()
    warmup.link.status = KVPoll.Success  # type: ignore[attr-defined]
    bench.step()
    assert warmup.state is State.SUCCESS and warmup.reads == 0 and bench.buffers.aux_reads == []


def test_deadlines_count_from_entering_the_state_not_from_arrival() -> None:
    clock = FakeClock()
    bench = Bench.make(clock=clock, transfer_timeout_s=60.0)
    request = bench.add(1, KVPoll.Bootstrapping)
    clock.t = 50.0
    bench.links[1].status = KVPoll.WaitingForInput
    bench.step()  # enters WAITING_FOR_INPUT, then TRANSFERRING, at t = 50
    assert request.state is State.TRANSFERRING
    clock.t = 100.0
    bench.step()
    assert request.state is State.TRANSFERRING  # 50 s in the state, not 100
    clock.t = 111.0
    bench.step()
    assert request.state is State.FAILED and isinstance(request.error, TimedOut)


@pytest.mark.parametrize(
    "fields",
    [
        {"default_alloc_tokens": 0},
        {"max_total_tokens": 0},
        {"max_total_tokens": -1},
        {"transfer_timeout_s": 0.0},
        {"resume_timeout_s": -1.0},
    ],
)
def test_impossible_configuration_is_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ReceiverConfig(**fields)  # type: ignore[arg-type]


def test_the_smallest_configuration_is_accepted() -> None:
    config = ReceiverConfig(default_alloc_tokens=1, max_total_tokens=1, transfer_timeout_s=0.5)
    assert (config.default_alloc_tokens, config.max_total_tokens, config.transfer_timeout_s) == (1, 1, 0.5)


def test_an_event_the_spec_does_not_allow_in_a_state_raises() -> None:
    from transitions import MachineError

    bench = Bench.make()
    request = bench.add(1)
    bench.step()
    assert request.state is State.TRANSFERRING
    with pytest.raises(MachineError):
        request.fire("release")  # only SUCCESS may be released
    with pytest.raises(MachineError):
        request.fire("round_landed")  # only RESUMING has rounds


# ---- gaps found by mutation testing -----------------------------------------------------------------


def test_a_room_already_queued_or_held_cannot_be_added_again() -> None:
    bench = Bench.make()
    bench.add(1)
    with pytest.raises(ValueError, match="already"):
        bench.queue.add(1, FakeLink())
    bench.step()
    bench.land(1, D, KVPoll.Success)
    bench.step()  # now held, awaiting release
    with pytest.raises(ValueError, match="already"):
        bench.queue.add(1, FakeLink())


def test_finished_requests_leave_the_shared_machine() -> None:
    bench = Bench.make()
    done, failed = bench.add(1), bench.add(2)
    machine = bench.queue._machine
    bench.step()
    bench.land(1, D, KVPoll.Success)
    bench.links[2].status = KVPoll.Failed
    bench.step()
    assert failed not in machine.models  # retired by the step that failed it
    assert done in machine.models  # held until released
    bench.queue.release(1)
    assert done not in machine.models


def test_an_open_aux_window_grants_only_a0_first_block() -> None:
    bench = Bench.make()
    request = bench.add(1)
    bench.step()
    request._window.grant_aux(request.first_block)
    with pytest.raises(ReadOutsideWindow, match="only A0"):
        request._window.read_aux(1)  # A0[1], not A0[0]
    assert bench.buffers.aux_reads == []


def test_a_last_round_counted_as_landed_before_its_success_is_not_read_as_a_round() -> None:
    bench, link, request = progress_bench(total=20)
    link.landed = 20  # the whole payload has landed, the Success status has not arrived yet
    bench.step()
    assert request.state is State.RESUMING and request.reads == 1 and len(link.resumes) == 1
    link.status = KVPoll.Success
    bench.step()
    assert request.state is State.SUCCESS and request.landed == 20


class ExplainingLink(FakeLink):
    """A link that, like SGLang's failure_exception(), can say why its sender failed."""

    def failure_reason(self) -> str | None:
        return "transfer engine returned -1" if self.status == KVPoll.Failed else None


def test_a_sender_failure_carries_the_senders_reason_when_the_link_has_one() -> None:
    bench = Bench.make()
    bench.links[SUBJECT] = ExplainingLink(KVPoll.WaitingForInput)
    subject = bench.queue.add(SUBJECT, bench.links[SUBJECT])
    bench.step()
    bench.links[SUBJECT].status = KVPoll.Failed
    bench.step()
    assert_failed_cleanly(bench, subject, SenderFailed)
    assert str(subject.error).endswith("poll Failed in TRANSFERRING: transfer engine returned -1")


# ---- tensor-parallel ranks (the controller's side; the ranks themselves are simulated in test_stateful) ---


class PeerRank:
    """A RankGroup of two whose other rank is scripted: its polls, deadline flags and answers to ``same``."""

    size = 2

    def __init__(self) -> None:
        self.peer_polls: dict[Room, int] = {}
        self.peer_late: set[Room] = set()  # rooms whose deadline has passed on the other rank's clock
        self.peer_early: set[Room] = set()  # rooms whose deadline has not passed on the other rank's clock
        self.peer_writing: set[Room] = set()  # rooms whose sender has not stopped on the other rank
        self.peer_disagrees = False
        self.calls: list[str] = []
        self.sent: list[list[int]] = []  # what this rank contributed to each reduce

    def min_reduce(self, rooms: Sequence[Room], values: Sequence[int]) -> list[int]:
        """The queue's columns, each one value per room: poll, in time, past, landed, sender done."""
        self.calls.append("min_reduce")
        self.sent.append(list(values))
        n = len(rooms)
        peer = list(values)
        for i, room in enumerate(rooms):
            peer[i] = self.peer_polls.get(room, values[i])
            if room in self.peer_late:
                peer[n + i], peer[2 * n + i] = 0, 1
            if room in self.peer_early:
                peer[n + i], peer[2 * n + i] = 1, 0
            if room in self.peer_writing:
                peer[4 * n + i] = 0
        return [min(a, b) for a, b in zip(values, peer, strict=True)]

    def same(self, values: Sequence[int]) -> bool:
        self.calls.append("same")
        return not self.peer_disagrees


def two_ranks_transferring(**options: Any) -> tuple[PeerRank, Bench, ReceiverRequest[FakePayload]]:
    """Room 1 on this rank of two, its init sent (A0 = blocks 0 and 1); the other rank is scripted."""
    peer = PeerRank()
    bench = Bench.make(ranks=peer, **options)
    request = bench.add(1)
    bench.step()
    return peer, bench, request


def test_a_status_only_one_rank_has_seen_does_not_move_any_rank() -> None:
    peer, bench, request = two_ranks_transferring()
    peer.peer_polls[1] = int(KVPoll.WaitingForInput)  # the other rank has not heard of the chunk yet
    bench.land(1, D, KVPoll.Success)

    bench.step(3)
    assert request.state is State.TRANSFERRING and bench.buffers.aux_reads == []

    del peer.peer_polls[1]
    bench.step()
    assert request.state is State.SUCCESS
    assert peer.calls.count("min_reduce") == 5  # one collective per iteration, whatever the number of requests


def test_ranks_that_read_different_totals_fail_the_request_on_every_rank() -> None:
    peer, bench, request = two_ranks_transferring()
    peer.peer_disagrees = True
    bench.land(1, D + 3 * B, KVPoll.Transferring)

    bench.step()

    assert request.state is State.FAILED and type(request.error) is RankDisagreement
    assert request.total_tokens is None and request.reads == 0  # nothing judged or read before agreeing
    assert request.fenced == (0, 1)  # the sender reported Transferring: it may still write


def test_a_rank_whose_allocator_drifted_is_found_by_the_lockstep_fingerprint() -> None:
    peer, bench, _ = two_ranks_transferring(lockstep_every=4)
    bench.step(2)
    peer.peer_disagrees = True
    with pytest.raises(RankDivergence, match="allocator operations differ"):
        bench.step()


def test_the_lockstep_fingerprint_folds_every_operation_in_order() -> None:
    from epd_receiver.fsm.lockstep import LockstepAllocator

    def run(operations: list[str]) -> int:
        lockstep = LockstepAllocator(FakeAllocator(8, B))
        for operation in operations:
            blocks = lockstep.alloc(1, B) if operation == "alloc" else None
            if operation == "free":
                lockstep.free(1, lockstep.inner.owned_by(1)[:1])  # type: ignore[attr-defined]
            assert blocks is None or len(blocks) == 1
        return lockstep.digest

    assert run(["alloc", "alloc", "free"]) == run(["alloc", "alloc", "free"])
    assert run(["alloc", "alloc", "free"]) != run(["alloc", "free", "alloc"])
    assert run(["alloc"]) != run([])


def test_a_deadline_that_passed_on_one_rank_fails_the_request_on_every_rank() -> None:
    peer, bench, request = two_ranks_transferring(clock=FakeClock())
    peer.peer_late.add(1)  # only the other rank's clock is past the transfer deadline

    bench.step()

    assert request.state is State.FAILED and type(request.error) is TimedOut
    assert request.fenced == (0, 1)


def test_a_fence_outlives_one_rank_s_sender_and_one_rank_s_clock() -> None:
    clock = FakeClock()
    peer, bench, request = two_ranks_transferring(clock=clock, drain_timeout_s=5.0)
    bench.queue.abort(1)
    peer.peer_writing.add(1)
    bench.links[1].status = int(KVPoll.Failed)  # this rank's sender stopped; the other rank's did not
    bench.step(2)
    assert request.fenced == (0, 1)

    clock.t += 6.0  # this rank's clock is past the drain deadline; the other rank's is not
    peer.peer_early.add(1)
    bench.step()
    assert request.fenced == (0, 1)

    peer.peer_early.clear()  # now every clock is past it: the other rank's sender is presumed gone
    bench.step()
    assert request.fenced == () and bench.queue.get(1) is None


def test_a_fence_lifts_when_every_rank_sender_has_stopped() -> None:
    peer, bench, request = two_ranks_transferring()
    bench.queue.abort(1)
    peer.peer_writing.add(1)
    bench.links[1].acknowledged = True
    bench.step()
    assert request.fenced == (0, 1)

    peer.peer_writing.clear()
    bench.step()
    assert request.fenced == () and bench.queue.get(1) is None


def test_ranks_that_assembled_different_payloads_fail_the_request_on_every_rank() -> None:
    peer, bench, request = two_ranks_transferring()
    bench.land(1, D, KVPoll.Success)
    answers = iter([True, False])  # the same (T, S, checksum) ... but not the same payload
    peer.same = lambda values: next(answers)  # type: ignore[method-assign]

    bench.step()

    assert request.state is State.FAILED and type(request.error) is RankDisagreement
    assert "different payloads" in str(request.error)
    assert request.fenced == () and bench.queue.get(1) is None  # the sender said Success: it is done


def test_the_lockstep_fingerprint_covers_fences() -> None:
    from epd_receiver.fsm.lockstep import LockstepAllocator

    digests = []
    for unfence in (False, True):
        lockstep = LockstepAllocator(FakeAllocator(8, B))
        blocks = lockstep.alloc(1, 2 * B)
        assert blocks is not None
        lockstep.fence(1, blocks)
        if unfence:
            lockstep.unfence(1, blocks)
        digests.append(lockstep.digest)
        assert lockstep.free_count == 6 + 2 * unfence and lockstep.num_blocks == 8 and lockstep.block_size == B
    assert digests[0] != digests[1]


def test_a_link_error_on_another_rank_fails_the_request_here_too_and_fences_its_blocks() -> None:
    peer, bench, request = two_ranks_transferring()
    held = request.blocks
    peer.peer_polls[1] = LINK_ERROR  # the other rank's init or poll raised
    peer.peer_writing.add(1)  # and its link has no evidence that its sender stopped
    bench.land(1, D, KVPoll.Success)  # this rank sees the chunk land: not enough

    bench.step()
    assert type(request.error) is TransportFailed and "another rank" in str(request.error)
    assert request.fenced == held and bench.buffers.aux_reads == []
    assert peer.calls.count("min_reduce") == 2  # reduced with the polls: no extra collective


def test_a_link_error_on_this_rank_reaches_the_other_rank_through_the_reduce() -> None:
    peer = PeerRank()
    bench = Bench.make(ranks=peer)
    bench.links[1] = BrokenLink("init")
    request = bench.queue.add(1, bench.links[1])
    bench.step()  # the init raises here; this rank does not fail alone
    assert request.state is State.TRANSFERRING
    bench.step()
    assert peer.sent[-1][0] == LINK_ERROR  # what the other rank receives as this rank's poll
    assert type(request.error) is TransportFailed and "init raised" in str(request.error)
    assert request.fenced


def test_a_value_above_success_on_one_rank_is_not_lost_under_the_min_and_fails_every_rank() -> None:
    peer, bench, request = two_ranks_transferring()
    peer.peer_polls[1] = int(KVPoll.Transferring)  # the other rank sees an honest status
    bench.links[1].status = 99  # this rank's link returns garbage

    bench.step()
    assert peer.sent[-1][0] == UNKNOWN_STATUS  # what this rank contributes: below every status
    assert type(request.error) is ProtocolViolation and "99 (not a KVPoll value)" in str(request.error)


def test_release_of_a_room_the_queue_does_not_hold_raises_a_typed_error_naming_it() -> None:
    bench = Bench.make()
    bench.add(1)
    with pytest.raises(UnknownRoom, match=r"room 7: .*not in the queue"):
        bench.queue.release(7)
    with pytest.raises(UnknownRoom, match=r"room 1: .*has not succeeded yet"):
        bench.queue.release(1)
    with pytest.raises(DuplicateRoom, match="room 1"):
        bench.add(1)
