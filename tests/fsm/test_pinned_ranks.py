"""Behaviour of the core on tensor-parallel ranks that the protocol tests pass through without pinning
down: the fingerprint of each rank's allocations (``fsm/lockstep.py``), what the queue reduces and
compares across the ranks, and what a disagreement says.

Each test states one observable behaviour that a plausible slip in the code would change and that the
tests above it do not distinguish (test_pinned_spec.py says more; spec/VERIFICATION.md §9 lists what
mutation testing of ``fsm/`` finds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from support.controller_bench import B, Bench, progress_request, two_ranks_transferring
from support.fakes import FakeAllocator, FakeBuffers, FakeClock, FakeLink, PeerRank

from epd_receiver.fsm import (
    LINK_ERROR,
    UNKNOWN_STATUS,
    AuxRow,
    ChecksumAlgorithm,
    KVPoll,
    RankDivergence,
    ReceiverConfig,
    ReceiverQueue,
    SingleRank,
    State,
    TimedOut,
)
from epd_receiver.fsm.lockstep import LockstepAllocator

# ---- a single rank and a broken group -----------------------------------------------------------------


def test_a_single_rank_reduces_to_its_own_values_and_always_agrees() -> None:
    rank = SingleRank()
    assert rank.size == 1
    assert rank.min_reduce([1, 2], [4, 0, 3, 9]) == [4, 0, 3, 9]
    assert rank.same([1]) and rank.same([])


class ShortReduce:
    """A broken RankGroup of two whose reduce loses the last value it was given."""

    size = 2

    def min_reduce(self, rooms: Sequence[int], values: Sequence[int]) -> list[int]:
        return list(values)[:-1]

    def same(self, values: Sequence[int]) -> bool:
        return True


def test_a_reduce_that_lost_values_is_not_taken_as_an_answer() -> None:
    buffers = FakeBuffers(B)
    config = ReceiverConfig(default_alloc_tokens=B)
    queue: ReceiverQueue[Any] = ReceiverQueue(buffers, FakeAllocator(8, B), config, ranks=ShortReduce())
    queue.add(1, FakeLink(KVPoll.WaitingForInput))
    queue.add(2, FakeLink(KVPoll.WaitingForInput))
    with pytest.raises(ValueError):
        queue.step()


# ---- the lockstep fingerprint -------------------------------------------------------------------------


class Permissive:
    """An allocator that accepts any operation: the fingerprint is a function of the operations alone."""

    block_size = B
    num_blocks = 8
    free_count = 8

    def __init__(self, grant: tuple[int, ...] | None = (0,)) -> None:
        self.grant = grant

    def alloc(self, owner: int, tokens: int) -> tuple[int, ...] | None:
        return self.grant

    def free(self, owner: int, blocks: Sequence[int]) -> None: ...

    def fence(self, owner: int, blocks: Sequence[int]) -> None: ...

    def unfence(self, owner: int, blocks: Sequence[int]) -> None: ...


@pytest.mark.parametrize("operation", ["alloc", "free", "fence", "unfence"])
def test_the_lockstep_fingerprint_tells_owners_and_operations_apart(operation: str) -> None:
    """Two ranks that did the same to the same blocks for different rooms, or something else, have drifted."""

    def digest(name: str, owner: int) -> int:
        lockstep = LockstepAllocator(Permissive())
        if name == "alloc":
            lockstep.alloc(owner, B)
        else:
            getattr(lockstep, name)(owner, (0,))
        return lockstep.digest

    assert digest(operation, 1) != digest(operation, 2)
    others = {digest(other, 1) for other in ("alloc", "free", "fence", "unfence") if other != operation}
    assert digest(operation, 1) not in others


@pytest.mark.parametrize("other", [(1,), (0, 1), None], ids=["other-block", "more-blocks", "refused"])
def test_the_lockstep_fingerprint_tells_what_an_allocation_granted(other: tuple[int, ...] | None) -> None:
    """Ranks whose allocators answered the same request differently have drifted."""

    def digest(grant: tuple[int, ...] | None) -> int:
        lockstep = LockstepAllocator(Permissive(grant))
        assert lockstep.alloc(1, B) == grant
        return lockstep.digest

    assert digest((0,)) != digest(other)


def test_the_lockstep_fingerprint_remembers_the_whole_history() -> None:
    """Ranks that differed many operations ago and did the same since still show different fingerprints."""

    def digest(first_owner: int) -> int:
        lockstep = LockstepAllocator(Permissive())
        lockstep.alloc(first_owner, B)
        for _ in range(3):
            lockstep.free(1, (0,))
        return lockstep.digest

    assert digest(1) != digest(2)


class RecordingPeer(PeerRank):
    def __init__(self) -> None:
        super().__init__()
        self.compared: list[list[int]] = []

    def same(self, values: Sequence[int]) -> bool:
        self.compared.append(list(values))
        return True


def test_the_lockstep_check_compares_a_fingerprint_of_this_rank_s_allocations() -> None:
    def compared(rooms: int) -> list[int]:
        peer = RecordingPeer()
        bench = Bench.make(ranks=peer, lockstep_every=2)
        for room in range(rooms):
            bench.add(room)
        bench.step(2)  # nothing lands: the only comparison is the lockstep check of iteration 2
        (values,) = peer.compared
        return values

    assert compared(1) == compared(1)
    assert compared(1) != compared(2)


def test_the_lockstep_check_runs_every_lockstep_every_iterations_and_names_the_iteration() -> None:
    peer, bench, _ = two_ranks_transferring(lockstep_every=4)  # one iteration so far
    peer.peer_disagrees = True
    bench.step(2)  # iterations 2 and 3 compare nothing
    with pytest.raises(RankDivergence, match=r"^iteration 4: the ranks' allocator operations differ"):
        bench.step()


# ---- what the ranks reduce ----------------------------------------------------------------------------


def test_with_ranks_a_deadline_is_past_only_after_it_not_at_it() -> None:
    clock = FakeClock()
    _, bench, request = two_ranks_transferring(clock=clock, transfer_timeout_s=10.0)
    clock.t = 10.0
    bench.step()
    assert request.state is State.TRANSFERRING
    clock.t = 10.5
    bench.step()
    assert request.state is State.FAILED and isinstance(request.error, TimedOut)


def test_with_ranks_a_sender_s_progress_is_reduced_and_rounds_are_read() -> None:
    peer = PeerRank()
    bench = Bench.make(num_blocks=3, ranks=peer)
    link, request = progress_request(bench, total=30)
    bench.step()
    assert request.state is State.RESUMING and link.resumes == [((2, 0, 1), 8, 12)]
    link.landed = 20
    bench.step()
    assert request.reads == 2 and link.resumes[-1] == ((2, 0, 1), 20, 12)


def test_a_link_without_progress_contributes_nothing_landed_to_the_reduce() -> None:
    peer, bench, _ = two_ranks_transferring()
    seen: list[list[int]] = []
    reduce = peer.min_reduce

    def recording(rooms: Sequence[int], values: Sequence[int]) -> list[int]:
        seen.append(list(values))
        return reduce(rooms, values)

    peer.min_reduce = recording  # type: ignore[method-assign]
    bench.step()
    poll, _, _, landed, _ = seen[-1]  # poll, in time, past, landed, sender done
    assert landed == 0 and poll == KVPoll.WaitingForInput


def test_a_link_error_on_another_rank_says_so() -> None:
    peer, bench, request = two_ranks_transferring()
    peer.peer_polls[1] = LINK_ERROR  # this rank's link is fine
    peer.peer_writing.add(1)
    bench.step()
    assert request.error is not None
    assert request.error.detail == "poll link_error in TRANSFERRING: the link raised on another rank"


def test_a_value_outside_kvpoll_seen_only_on_another_rank_says_so() -> None:
    peer, bench, request = two_ranks_transferring()
    peer.peer_polls[1] = UNKNOWN_STATUS  # this rank's link returned an honest status
    bench.step()
    assert request.error is not None
    assert request.error.detail == "poll a value outside KVPoll on another rank in TRANSFERRING"


# ---- what the ranks compare ---------------------------------------------------------------------------


def test_the_ranks_compare_t_s_and_the_checksum_this_rank_read() -> None:
    crc32, xxh3 = ChecksumAlgorithm.CRC32, ChecksumAlgorithm.XXH3_64
    cases = ((None, xxh3, [-1, 0, 0]), (0xDEAD, crc32, [1, 0xDEAD, 0]), (0xABCD_0000_DEAD, xxh3, [2, 0xDEAD, 0xABCD]))
    for checksum, algorithm, expected in cases:
        peer = RecordingPeer()
        bench = Bench.make(ranks=peer)
        bench.add(1)
        bench.step()
        bench.buffers.aux[0] = AuxRow(20, 7, checksum=checksum, checksum_algorithm=algorithm)
        bench.links[1].status = int(KVPoll.Transferring)
        bench.step()
        # T, S = |A0|*B, then the algorithm and the digest's low and high 32 bits (-1: none, never an algorithm)
        assert peer.compared[0] == [20, 8, *expected]


def test_ranks_that_read_different_totals_fail_with_what_this_rank_read() -> None:
    peer, bench, request = two_ranks_transferring()
    peer.peer_disagrees = True
    bench.land(1, 20, KVPoll.Transferring)
    bench.step()
    assert request.error is not None and request.error.room == 1
    assert request.error.detail == "the ranks differ on (T, S, checksum); this rank read [20, 8, -1, 0, 0]"


def test_ranks_compare_the_payload_they_assembled_unless_told_not_to() -> None:
    for compare in (True, False):
        peer = RecordingPeer()
        bench = Bench.make(ranks=peer, compare_payloads=compare)
        request = bench.add(1)
        bench.step()
        bench.land(1, 8, KVPoll.Success)
        bench.step()
        assert request.state is State.SUCCESS and request.payload is not None
        checksum = bench.buffers.checksum(request.payload, ChecksumAlgorithm.XXH3_64)  # no sender's: the default
        halves = [checksum & 0xFFFFFFFF, checksum >> 32]
        assert peer.compared == ([[8, 8, -1, 0, 0], halves] if compare else [[8, 8, -1, 0, 0]])


def test_ranks_that_assembled_different_payloads_fail_saying_so() -> None:
    peer, bench, request = two_ranks_transferring()
    answers = iter([True, False])  # the same (T, S, checksum), not the same payload
    peer.same = lambda values: next(answers)  # type: ignore[method-assign]
    bench.land(1, 8, KVPoll.Success)
    bench.step()
    assert request.error is not None and request.error.room == 1
    assert request.error.detail == "the ranks assembled different payloads"
