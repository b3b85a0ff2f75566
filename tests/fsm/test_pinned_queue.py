"""Behaviour of the queue that the protocol tests pass through without pinning down: the queue
(``fsm/queue.py``) and its configuration (``fsm/config.py``): the limits a config refuses, what becomes
of an aborted request and its fence, and the allocation pass.

Each test states one observable behaviour that a plausible slip in the code would change and that the
tests above it do not distinguish (test_pinned_spec.py says more; spec/VERIFICATION.md §9 lists what
mutation testing of ``fsm/`` finds).
"""

from __future__ import annotations

import pytest
from support.controller_bench import Bench, progress_request
from support.fakes import FakeAllocator, FakeBuffers, FakeLink, ProgressLink

from epd_receiver.fsm import ConfigError, KVPoll, ReceiverConfig, ReceiverQueue, State

# ---- configuration ------------------------------------------------------------------------------------

POSITIVE_COUNTS = ("default_alloc_tokens", "max_total_tokens", "lockstep_every")
TIMEOUTS = ("bootstrap", "admission", "transfer", "blocks", "resume", "drain")


@pytest.mark.parametrize("name", POSITIVE_COUNTS)
def test_a_count_of_zero_is_refused_by_name(name: str) -> None:
    with pytest.raises(
        ValueError, match=r"^default_alloc_tokens, max_total_tokens and lockstep_every must be positive$"
    ):
        ReceiverConfig(**{name: 0})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", TIMEOUTS)
def test_a_deadline_of_zero_is_refused_by_name(name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}_timeout_s must be positive or None$"):
        ReceiverConfig(**{f"{name}_timeout_s": 0.0})  # type: ignore[arg-type]


def test_the_smallest_counts_and_deadlines_are_accepted() -> None:
    tiny = {f"{name}_timeout_s": 1e-9 for name in TIMEOUTS}
    config = ReceiverConfig(default_alloc_tokens=1, max_total_tokens=1, lockstep_every=1, **tiny)  # type: ignore[arg-type]
    assert (config.default_alloc_tokens, config.max_total_tokens, config.lockstep_every) == (1, 1, 1)
    assert ReceiverConfig(**dict.fromkeys(tiny)).drain_timeout_s is None  # type: ignore[arg-type]


def test_a_queue_refuses_buffers_and_an_allocator_of_different_block_sizes() -> None:
    config = ReceiverConfig(default_alloc_tokens=8)
    with pytest.raises(ConfigError, match=r"^buffers.block_size=4 differs from allocator.block_size=8$"):
        ReceiverQueue(FakeBuffers(4), FakeAllocator(8, 8), config)


# ---- aborts and fences --------------------------------------------------------------------------------


class CountingLink(FakeLink):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.polls = 0

    def poll(self) -> int:
        self.polls += 1
        return super().poll()


def test_an_aborted_request_that_holds_nothing_is_not_polled_again() -> None:
    bench = Bench.make()
    link = bench.links[1] = CountingLink(KVPoll.Bootstrapping)
    request = bench.queue.add(1, link)
    bench.step()
    assert bench.queue.abort(1) and request.fenced == ()
    polls = link.polls
    assert bench.step() == [request]
    assert link.polls == polls and bench.queue.get(1) is None


def test_a_fence_of_a_request_aborted_since_the_last_iteration_lifts_in_the_next_one() -> None:
    """The abort's own iteration polls the fence: a sender that stopped by then frees the blocks at once."""
    bench = Bench.make()
    request = bench.add(1)
    bench.step()  # init sent for (0, 1)
    assert bench.queue.abort(1) and request.fenced == (0, 1)
    bench.links[1].status = int(KVPoll.Failed)  # the sender stopped
    assert bench.step() == [request]
    assert request.fenced == () and bench.queue.get(1) is None and bench.allocator.free_count == 8


class UnsureLink(FakeLink):
    """A link that raises when asked whether its sender stopped: that is no evidence that it did."""

    def writes_stopped(self) -> bool:
        raise ConnectionError("peer reset")


def test_a_link_that_cannot_say_whether_its_sender_stopped_keeps_the_fence() -> None:
    bench = Bench.make()
    link = bench.links[1] = UnsureLink(KVPoll.WaitingForInput)
    request = bench.queue.add(1, link)
    bench.step()
    assert bench.queue.abort(1) and request.fenced == (0, 1)
    link.status = int(KVPoll.Failed)
    bench.step(3)
    assert request.fenced == (0, 1) and bench.queue.fenced_rooms == (1,)


# ---- the allocation pass ------------------------------------------------------------------------------


def test_a_request_too_large_for_the_pool_is_told_how_many_blocks_it_needs() -> None:
    bench = Bench.make(num_blocks=2, default_alloc=4)
    request = bench.add(1)
    bench.step()
    bench.land(1, 4 + 9, KVPoll.Transferring)  # a remainder of 9: ceil(9 / 4) = 3 blocks
    bench.step()
    assert request.error is not None and request.error.detail == "needs 3 blocks, the pool has 2"


def test_with_progress_a_remainder_of_one_token_gets_its_block() -> None:
    bench = Bench.make(num_blocks=3)
    link, request = progress_request(bench, total=9)
    bench.step()
    assert request.state is State.RESUMING and link.resumes == [((2,), 8, 4)]


def test_with_progress_an_empty_pool_grants_no_round_of_zero_blocks() -> None:
    bench = Bench.make(num_blocks=4)
    links = {room: ProgressLink() for room in (1, 2)}
    requests = {room: bench.queue.add(room, link) for room, link in links.items()}
    bench.links.update(links)
    bench.step()  # A0 = (0, 1) and (2, 3)
    for room, link in links.items():
        bench.land(room, 30, KVPoll.Transferring)
        link.landed = 8
    bench.step()  # both chunks are read; the first remainder takes every block
    assert links[1].resumes == [((0, 1, 2, 3), 8, 16)]
    assert requests[2].state is State.WAITING_FOR_BLOCKS and links[2].resumes == []
