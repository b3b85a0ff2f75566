"""Per-state deadlines: a request that overstays a waiting state times out and frees what it holds.

A deadline counts from entering the state, exactly-at is still in time, and a status already there wins.
"""

from __future__ import annotations

import pytest
from support.controller_bench import SPEC, SUBJECT, Bench, D, assert_failed_cleanly, bench_with_subject_in
from support.fakes import FakeClock

from epd_receiver.fsm import (
    KVPoll,
    State,
    TimedOut,
)

# ---- deadlines --------------------------------------------------------------------------------------


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
