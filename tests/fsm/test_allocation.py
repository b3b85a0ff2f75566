"""The queue's allocation and release: who gets blocks first, what waits, what cannot fit, and who holds what.

A full pool must park a remainder holding nothing and never deadlock; a request that cannot fit must fail
without holding back the ones behind it; blocks come back exactly once, on release or failure.
"""

from __future__ import annotations

import pytest
from support.controller_bench import BYSTANDER, POOL, SUBJECT, B, Bench, D, assert_failed_cleanly
from support.fakes import HOG, FakeLink

from epd_receiver.fsm import (
    ContractError,
    DuplicateRoom,
    KVPoll,
    PoolTooSmall,
    State,
    UnknownRoom,
)


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


def test_a_remainder_larger_than_the_pool_fails_with_pool_too_small() -> None:
    bench = Bench.make()
    request = bench.add(1)
    bench.step()
    bench.land(1, D + POOL * B + 1, KVPoll.Transferring)  # a remainder of POOL + 1 blocks
    bench.step()

    assert_failed_cleanly(bench, request, PoolTooSmall)
    assert bench.links[1].resumes == []


# ---- the allocation pass, and who holds what ---------------------------------------------------------


def test_a_request_too_large_for_the_pool_does_not_hold_back_the_ones_behind_it() -> None:
    bench = Bench.make()
    too_large = bench.add(SUBJECT)
    bench.step()
    bench.land(SUBJECT, D + POOL * B + 1, KVPoll.Transferring)  # its remainder exceeds the pool
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


def test_double_free_is_a_contract_error_not_a_failed_request() -> None:
    bench = Bench.make()
    request = bench.add(1)
    bench.step()
    bench.allocator.free(1, request.blocks)  # someone else returned the blocks behind its back

    with pytest.raises(ContractError):
        bench.queue.abort(1)


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


def test_release_of_a_room_the_queue_does_not_hold_raises_a_typed_error_naming_it() -> None:
    bench = Bench.make()
    bench.add(1)
    with pytest.raises(UnknownRoom, match=r"room 7: .*not in the queue"):
        bench.queue.release(7)
    with pytest.raises(UnknownRoom, match=r"room 1: .*has not succeeded yet"):
        bench.queue.release(1)
    with pytest.raises(DuplicateRoom, match="room 1"):
        bench.add(1)
