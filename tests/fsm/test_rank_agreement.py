"""Tensor-parallel ranks, the controller's side: every rank moves together or fails together.

The other rank is scripted (fakes.PeerRank); ranks simulated in full are in test_stateful.
"""

from __future__ import annotations

import pytest
from support.controller_bench import B, Bench, D, two_ranks_transferring
from support.fakes import BrokenLink, FakeAllocator, FakeClock, PeerRank

from epd_receiver.fsm import (
    LINK_ERROR,
    UNKNOWN_STATUS,
    KVPoll,
    ProtocolViolation,
    RankDisagreement,
    RankDivergence,
    State,
    TimedOut,
    TransportFailed,
)

# ---- tensor-parallel ranks (the controller's side; the ranks themselves are simulated in test_stateful) ---


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
