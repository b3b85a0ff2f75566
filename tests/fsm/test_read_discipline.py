"""The read discipline (I1, I2): the pool is read only inside a transition that grants it, the aux row once.

A read outside a window is a bug of the controller (a ContractError), never a failed request; and the
per-poll fast path calls no trigger at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from support.controller_bench import MAX_T, POOL, RESUMED_TOTAL, SUBJECT, B, Bench, D, bench_with_subject_in
from support.fakes import FakeAllocator, FakeBuffers, FakeLink, FakePayload

from epd_receiver.fsm import (
    AuxRow,
    KVPoll,
    ReadOutsideWindow,
    ReceiverConfig,
    ReceiverQueue,
    ReceiverRequest,
    State,
)

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


def test_an_open_aux_window_grants_only_a0_first_block() -> None:
    bench = Bench.make()
    request = bench.add(1)
    bench.step()
    request._window.grant_aux(request.first_block)
    with pytest.raises(ReadOutsideWindow, match="only A0"):
        request._window.read_aux(1)  # A0[1], not A0[0]
    assert bench.buffers.aux_reads == []


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
