"""Every cell of the spec's poll table, driven through the controller, and values no cell names.

The table is the controller's whole reaction to a status, so each (state, value) pair is checked against
what the spec declares: the fast path, an event and its destination, or a typed failure.
"""

from __future__ import annotations

from typing import Any

import pytest
from support.controller_bench import (
    BYSTANDER,
    NON_TERMINAL,
    PARKED_TOTAL,
    SPEC,
    SUBJECT,
    Bench,
    D,
    assert_failed_cleanly,
    bench_with_subject_in,
)

from epd_receiver.fsm import (
    KVPoll,
    ProtocolViolation,
    ReceiverRequest,
    State,
)
from epd_receiver.fsm.spec import Guards, PollOutcome

# ---- the poll table, cell by cell ---------------------------------------------------------------------


def expected_dest(state: State, event: str) -> State:
    """Where a (non-warm-up) request goes on ``event``."""
    (transition,) = [t for t in SPEC.transitions_from(state) if t.trigger == event and "is_warmup" not in t.conditions]
    return state if transition.internal else transition.dest


def refused(subject: ReceiverRequest[Any], outcome: PollOutcome) -> bool:
    """Whether every transition of the cell's event from here is refused by its guards, as they answer now."""

    def holds(guards: Guards) -> bool:
        return all(getattr(subject, g)() for g in guards.conditions) and not any(
            getattr(subject, g)() for g in guards.unless
        )

    return bool(outcome.enabled_if) and not any(holds(guards) for guards in outcome.enabled_if)


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
    # a cell is the fast path while the guards of its event's transitions refuse it (here: a link without progress)
    noop = outcome.is_noop or refused(subject, outcome)

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
