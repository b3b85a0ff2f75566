"""The small bench every controller test drives: a ReceiverQueue over the fakes, and the states it puts a subject in.

A failure must leave the same things behind wherever it happens, so ``assert_failed_cleanly`` states them once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from epd_receiver.fsm import (
    AuxRow,
    KVPoll,
    ReceiverConfig,
    ReceiverError,
    ReceiverQueue,
    ReceiverRequest,
    Room,
    State,
    load_spec,
)
from support.fakes import FakeAllocator, FakeBuffers, FakeLink, FakePayload, PeerRank, ProgressLink

SPEC = load_spec()
NON_TERMINAL = [s for s in State if s not in SPEC.terminal]


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
        metrics: Any = None,
        **timeouts: Any,
    ) -> Bench:
        buffers = FakeBuffers(block_size)
        allocator = FakeAllocator(num_blocks, block_size)
        config = ReceiverConfig(default_alloc_tokens=default_alloc, max_total_tokens=max_total, **timeouts)
        queue: ReceiverQueue[FakePayload] = ReceiverQueue(
            buffers, allocator, config, clock=clock, ranks=ranks, metrics=metrics
        )
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


def two_ranks_transferring(**options: Any) -> tuple[PeerRank, Bench, ReceiverRequest[FakePayload]]:
    """Room 1 on this rank of two, its init sent (A0 = blocks 0 and 1); the other rank is scripted."""
    peer = PeerRank()
    bench = Bench.make(ranks=peer, **options)
    request = bench.add(1)
    bench.step()
    return peer, bench, request


def progress_request(bench: Bench, total: int, room: int = 1) -> tuple[ProgressLink, Any]:
    """A request whose link reports progress, its init sent; its first chunk of 8 has landed (not yet read)."""
    link = ProgressLink()
    bench.links[room] = link
    request = bench.queue.add(room, link)
    bench.step()
    bench.land(room, total, KVPoll.Transferring)
    link.landed = 8
    return link, request
