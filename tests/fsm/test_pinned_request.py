"""Behaviour of the request that the protocol tests pass through without pinning down: the request
(``fsm/request.py``, ``fsm/assembly.py``, ``fsm/window.py``): what it may read, and what its failure
says.

Each test states one observable behaviour that a plausible slip in the code would change and that the
tests above it do not distinguish (test_pinned_spec.py says more; spec/VERIFICATION.md §9 lists what
mutation testing of ``fsm/`` finds).
"""

from __future__ import annotations

import pytest
from support.controller_bench import B, Bench, progress_request
from support.fakes import BrokenLink, FakeAllocator, FakeBuffers, FakeClock, FakeLink, FakePayload

from epd_receiver.fsm import KVPoll, ReadOutsideWindow, ReceiverConfig, SingleRank, State, load_spec

# ---- the request --------------------------------------------------------------------------------------


def test_a_request_is_not_a_warm_up_unless_it_is_said_to_be() -> None:
    from epd_receiver.fsm.config import Wiring, deadlines, poll_table
    from epd_receiver.fsm.request import ReceiverRequest

    spec, config = load_spec(), ReceiverConfig()
    buffers, allocator = FakeBuffers(B), FakeAllocator(8, B)
    wiring = Wiring(
        spec,
        poll_table(spec, ReceiverRequest),
        buffers,
        allocator,
        config,
        FakeClock(),
        deadlines(spec, config),
        SingleRank(),
    )
    assert ReceiverRequest(1, FakeLink(), wiring).warmup is False


def test_a_read_outside_its_window_names_the_room() -> None:
    bench = Bench.make()
    request = bench.add(7)
    bench.step()
    with pytest.raises(ReadOutsideWindow, match=r"^room 7: read of blocks \[0, 1\]; granted: None$"):
        request._window.gather(request.blocks, B, FakePayload(B, 0, [None] * B), 0)
    with pytest.raises(ReadOutsideWindow, match=r"^room 7: aux read of block 0; granted: None"):
        request._window.read_aux(0)


def test_a_read_before_any_event_is_outside_every_window() -> None:
    bench = Bench.make()
    request = bench.add(3)
    with pytest.raises(ReadOutsideWindow, match=r"^room 3: aux read of block 0; granted: None \(only A0\[0\]\)$"):
        request._window.read_aux(0)
    with pytest.raises(ReadOutsideWindow, match=r"^room 3: read of blocks \[0\]; granted: None$"):
        request._window.gather((0,), B, FakePayload(B, 0, [None] * B), 0)


# ---- what a failure says ------------------------------------------------------------------------------


class SilentReasonLink(FakeLink):
    """A link that offers a failure reason but has none to give (or fails to give it)."""

    def __init__(self, status: int, raises: bool) -> None:
        super().__init__(status)
        self.raises = raises

    def failure_reason(self) -> str | None:
        if self.raises:
            raise RuntimeError("no reason available")
        return None


@pytest.mark.parametrize("raises", [False, True], ids=["none", "raises"])
def test_a_sender_failure_without_a_reason_says_only_what_was_polled(raises: bool) -> None:
    bench = Bench.make()
    link = bench.links[1] = SilentReasonLink(KVPoll.WaitingForInput, raises)
    request = bench.queue.add(1, link)
    bench.step()
    link.status = int(KVPoll.Failed)
    bench.step()
    assert request.error is not None and request.error.detail == "poll Failed in TRANSFERRING"


def test_a_client_abort_says_so() -> None:
    bench = Bench.make()
    request = bench.add(1)
    assert bench.queue.abort(1)
    assert request.error is not None and request.error.detail == "aborted by the client"


@pytest.mark.parametrize(
    ("total", "status", "detail"),
    [
        (0, KVPoll.Success, "aux[0] of block 0 is 0, outside 1..1000"),
        (6, KVPoll.Transferring, "Transferring, but T=6 fits in the 8 tokens allocated"),
        (9, KVPoll.Success, "Success, but T=9 exceeds the 8 tokens allocated"),
    ],
    ids=["corrupt", "fits", "exceeds"],
)
def test_a_total_that_cannot_be_true_is_named_in_the_error(total: int, status: KVPoll, detail: str) -> None:
    bench = Bench.make(max_total=1000)
    request = bench.add(1)
    bench.step()
    bench.land(1, total, status)
    bench.step()
    assert request.error is not None and request.error.detail == detail


def test_a_landed_count_that_does_not_match_is_named_in_the_error() -> None:
    bench = Bench.make(num_blocks=3)
    link, request = progress_request(bench, total=30)
    link.landed = 7  # a whole A0 holds 8
    bench.step()
    assert request.error is not None
    assert request.error.detail == "the sender reports 7 tokens landed; after 0 the allocation holds 8"


@pytest.mark.parametrize("broken", ["init", "resume"])
def test_a_link_that_raised_is_named_with_what_it_was_asked(broken: str) -> None:
    bench = Bench.make()
    link = bench.links[1] = BrokenLink(broken)
    request = bench.queue.add(1, link)
    bench.step()
    if broken == "resume":
        bench.land(1, 20, KVPoll.Transferring)
        bench.step()
    state = request.state.name
    bench.step()
    assert request.error is not None
    assert request.error.detail == f"poll link_error in {state}: {broken} raised ConnectionError('peer reset')"


class AbortRaisingLink(FakeLink):
    def abort(self) -> None:
        super().abort()
        raise ConnectionError("peer reset")


@pytest.mark.parametrize("how", ["abort", "sender failed"])
def test_a_link_that_raises_when_told_of_the_failure_does_not_stop_the_failure(how: str) -> None:
    bench = Bench.make()
    link = bench.links[1] = AbortRaisingLink(KVPoll.WaitingForInput)
    request = bench.queue.add(1, link)
    bench.step()
    if how == "abort":
        assert bench.queue.abort(1)
    else:
        link.status = int(KVPoll.Failed)
    bench.step()
    assert request.state is State.FAILED and link.aborts == 1
