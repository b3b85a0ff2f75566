"""The paths a request takes through the controller: no resume, one resume, and several resume rounds.

Each path pins what the controller sends (init, resumes), what it reads (one aux row, one gather per landed
round) and what it holds at the end.
"""

from __future__ import annotations

import pytest
from support.controller_bench import SUBJECT, B, Bench, D, assert_failed_cleanly
from support.fakes import FakePayload, ProgressLink

from epd_receiver.fsm import (
    KVPoll,
    PoolTooSmall,
    ReceiverRequest,
    SizeMismatch,
    State,
)

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


# ---- several resume rounds (links that report progress) ---------------------------------------------


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


def test_a_last_round_counted_as_landed_before_its_success_is_not_read_as_a_round() -> None:
    bench, link, request = progress_bench(total=20)
    link.landed = 20  # the whole payload has landed, the Success status has not arrived yet
    bench.step()
    assert request.state is State.RESUMING and request.reads == 1 and len(link.resumes) == 1
    link.status = KVPoll.Success
    bench.step()
    assert request.state is State.SUCCESS and request.landed == 20
