"""Aborts, link errors and fences (#23): blocks the sender may still write stay out of the pool until it stops.

Only evidence from the remote side (a terminal status, an acknowledged abort) or the drain deadline lifts a
fence; what our own side concluded never does.
"""

from __future__ import annotations

from typing import Any

import pytest
from support.controller_bench import (
    BYSTANDER,
    NON_TERMINAL,
    RESUMED_TOTAL,
    SUBJECT,
    Bench,
    D,
    assert_failed_cleanly,
    bench_with_subject_in,
    subject_lands,
)
from support.fakes import BrokenLink, ConcludingLink, FakeClock, FakeLink, RaisingLink

from epd_receiver.fsm import (
    Aborted,
    CorruptAux,
    KVPoll,
    SenderFailed,
    SizeMismatch,
    State,
    TransportFailed,
)

# ---- link errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_on", ["init", "resume"])
def test_typed_error_from_a_port_during_an_action_fails_only_that_request_and_frees_its_blocks(fail_on: str) -> None:
    bench = Bench.make()
    bench.links[SUBJECT] = RaisingLink(fail_on, SUBJECT)
    subject = bench.queue.add(SUBJECT, bench.links[SUBJECT])
    bystander = bench.add(BYSTANDER)
    bench.step()
    if fail_on == "resume":
        bench.land(SUBJECT, RESUMED_TOTAL, KVPoll.Transferring)
        bench.land(BYSTANDER, D, KVPoll.Success)
        bench.step()
    else:
        bench.land(BYSTANDER, D, KVPoll.Success)
        bench.step()

    assert_failed_cleanly(bench, subject, SenderFailed)
    assert bystander.state is State.SUCCESS


@pytest.mark.parametrize("broken", ["init", "resume", "poll"])
def test_a_link_that_raises_fails_only_that_request_with_transport_failed_and_fences_its_blocks(broken: str) -> None:
    """Whether the sender stopped writing is unknown after a link error: the blocks stay out of the pool."""
    bench = Bench.make()
    bench.links[SUBJECT] = BrokenLink(broken)
    subject = bench.queue.add(SUBJECT, bench.links[SUBJECT])
    bystander = bench.add(BYSTANDER)
    bench.step()
    if broken == "resume":
        bench.land(SUBJECT, RESUMED_TOTAL, KVPoll.Transferring)
        bench.step()
    held = subject.blocks
    assert held and subject.state is not State.FAILED  # the error surfaces at the next poll, on every rank
    bench.land(BYSTANDER, D, KVPoll.Success)
    bench.step()

    assert type(subject.error) is TransportFailed
    assert "peer reset" in str(subject.error)
    assert subject.fenced == held and bench.allocator.fenced_by(SUBJECT) == tuple(sorted(held))
    assert bystander.state is State.SUCCESS
    assert_failed_cleanly(bench, subject, TransportFailed)


# ---- client aborts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("state", NON_TERMINAL, ids=[s.name for s in NON_TERMINAL])
def test_abort_in_every_non_terminal_state_fails_cleanly(state: State) -> None:
    bench = bench_with_subject_in(state)
    subject = bench.queue.get(SUBJECT)
    bystander = bench.queue.get(BYSTANDER)
    assert subject is not None and bystander is not None

    assert bench.queue.abort(SUBJECT) is True
    assert subject.state is State.FAILED
    assert bench.queue.abort(SUBJECT) is False  # already over

    bench.land(BYSTANDER, D, KVPoll.Success)
    ended = bench.step()

    assert subject in ended
    assert_failed_cleanly(bench, subject, Aborted)
    assert bystander.state is State.SUCCESS


def test_abort_of_a_finished_or_unknown_request_does_nothing() -> None:
    bench = Bench.make()
    request = bench.add(1)
    bench.step()
    bench.land(1, D, KVPoll.Success)
    bench.step()

    assert bench.queue.abort(1) is False
    assert bench.queue.abort(99) is False
    assert request.state is State.SUCCESS
    assert bench.allocator.owned_by(1) == (0, 1)
    assert bench.links[1].aborts == 0


# ---- fencing (#23) ------------------------------------------------------------------------------------

WRITING = [State.TRANSFERRING, State.RESUMING]  # an init or resume is out: the sender may be writing


def aborted_while_writing(state: State, clock: Any = None, **timeouts: float | None) -> tuple[Bench, Any]:
    bench = bench_with_subject_in(state, clock=clock, **timeouts)
    subject = bench.queue.get(SUBJECT)
    assert subject is not None
    held = subject.blocks
    assert bench.queue.abort(SUBJECT)
    assert subject.fenced == held and subject.blocks == ()
    assert bench.allocator.fenced_by(SUBJECT) == tuple(sorted(held))
    assert not set(held) & set(bench.allocator.free_list)
    assert bench.links[SUBJECT].aborts == 1  # the sender is told at once
    return bench, subject


@pytest.mark.parametrize("state", WRITING, ids=lambda s: s.name)
@pytest.mark.parametrize("stop", [KVPoll.Failed, KVPoll.Success], ids=lambda s: s.name)
def test_blocks_of_a_request_failed_mid_write_stay_fenced_until_a_terminal_status(state: State, stop: KVPoll) -> None:
    bench, subject = aborted_while_writing(state)
    fenced = subject.fenced
    bench.land(BYSTANDER, D, KVPoll.Success)
    newcomer = bench.add(3)
    for status in (KVPoll.WaitingForInput, KVPoll.Transferring, KVPoll.Bootstrapping, 7):
        bench.links[SUBJECT].status = int(status)  # still writing, or nonsense: the fence holds
        bench.step()
        assert subject.fenced == fenced and bench.queue.get(SUBJECT) is subject
    bench.queue.release(BYSTANDER)  # the bystander's blocks come back, the fenced ones do not
    bench.step()
    assert not set(newcomer.blocks) & set(fenced)

    bench.links[SUBJECT].status = int(stop)
    bench.step()

    assert subject.fenced == () and subject.state is State.FAILED and type(subject.error) is Aborted
    assert bench.allocator.fenced_by(SUBJECT) == () and bench.allocator.owned_by(SUBJECT) == ()
    assert bench.allocator.blocks_freed_by(SUBJECT) == bench.allocator.blocks_allocated_to(SUBJECT)
    assert bench.queue.get(SUBJECT) is None and SUBJECT not in bench.queue.fenced_rooms
    assert bench.links[SUBJECT].aborts == 1


@pytest.mark.parametrize("state", WRITING, ids=lambda s: s.name)
def test_an_acknowledged_abort_lifts_the_fence(state: State) -> None:
    bench, subject = aborted_while_writing(state)
    bench.links[SUBJECT].status = int(KVPoll.Transferring)
    bench.step()
    assert subject.fenced != ()

    bench.links[SUBJECT].acknowledged = True
    bench.step()

    assert subject.fenced == () and bench.queue.get(SUBJECT) is None


@pytest.mark.parametrize("state", WRITING, ids=lambda s: s.name)
def test_a_silent_sender_is_presumed_gone_after_the_drain_deadline(state: State) -> None:
    clock = FakeClock()
    bench, subject = aborted_while_writing(state, clock, drain_timeout_s=5.0)
    bench.links[SUBJECT].status = int(KVPoll.Transferring)
    clock.t += 5.0
    bench.step()
    assert subject.fenced != ()  # not past it yet

    clock.t += 0.5
    bench.step()

    assert subject.fenced == () and bench.queue.get(SUBJECT) is None
    assert bench.allocator.blocks_freed_by(SUBJECT) == bench.allocator.blocks_allocated_to(SUBJECT)
    assert type(subject.error) is Aborted  # the drain changes the pool, not the outcome


def concluding_bench(state: State, clock: Any = None, **timeouts: float | None) -> tuple[Bench, Any]:
    bench = Bench.make(clock=clock, **timeouts)
    bench.links[SUBJECT] = ConcludingLink()
    subject = bench.queue.add(SUBJECT, bench.links[SUBJECT])
    bench.step()
    if state is State.RESUMING:
        bench.land(SUBJECT, RESUMED_TOTAL, KVPoll.Transferring)
        bench.step(2)
    assert subject.state is state
    return bench, subject


@pytest.mark.parametrize("state", WRITING, ids=lambda s: s.name)
@pytest.mark.parametrize("ending", ["abort", "timeout"])
def test_a_failed_that_our_own_side_concluded_never_lifts_a_fence(state: State, ending: str) -> None:
    clock = FakeClock()
    bench, subject = concluding_bench(
        state, clock, transfer_timeout_s=10.0, resume_timeout_s=10.0, drain_timeout_s=30.0
    )
    held = subject.blocks
    if ending == "abort":
        bench.queue.abort(SUBJECT)
    else:
        clock.t += 10.5
        bench.step()
    assert bench.links[SUBJECT].poll() == KVPoll.Failed  # what the link now says, of its own accord
    newcomer = bench.add(3)
    bench.step(5)

    assert subject.fenced == held and not set(newcomer.blocks) & set(held)  # the late write has nowhere to land
    bench.links[SUBJECT].status = int(KVPoll.Success)  # the remote side finished its write: evidence
    bench.step()
    assert subject.fenced == () and bench.queue.get(SUBJECT) is None


def test_a_fence_of_a_sender_that_never_hears_of_the_abort_lifts_at_the_drain_deadline() -> None:
    clock = FakeClock()
    bench, subject = concluding_bench(State.TRANSFERRING, clock, drain_timeout_s=30.0)
    bench.queue.abort(SUBJECT)
    bench.links[SUBJECT].status = int(KVPoll.Transferring)  # its chunk landed; it waits for a resume forever
    clock.t += 29.0
    bench.step()
    assert subject.fenced != ()
    clock.t += 1.5
    bench.step()
    assert subject.fenced == () and type(subject.error) is Aborted


def test_without_a_drain_deadline_a_silent_sender_keeps_its_fence() -> None:
    clock = FakeClock()
    bench, subject = aborted_while_writing(State.TRANSFERRING, clock, drain_timeout_s=None)
    clock.t += 1e9
    bench.step(3)
    assert subject.fenced != ()


@pytest.mark.parametrize("state", [s for s in NON_TERMINAL if s not in WRITING], ids=lambda s: s.name)
def test_a_request_that_holds_nothing_the_sender_writes_is_retired_at_once(state: State) -> None:
    bench = bench_with_subject_in(state)
    bench.queue.abort(SUBJECT)
    bench.step()
    assert bench.queue.get(SUBJECT) is None and bench.allocator.fenced == {}


@pytest.mark.parametrize("state", WRITING, ids=lambda s: s.name)
def test_a_sender_that_reported_failed_has_stopped_so_nothing_is_fenced(state: State) -> None:
    bench = bench_with_subject_in(state)
    subject = bench.queue.get(SUBJECT)
    assert subject is not None
    bench.links[SUBJECT].status = int(KVPoll.Failed)
    bench.step()
    assert subject.state is State.FAILED and subject.fenced == () and bench.allocator.fenced == {}
    assert bench.queue.get(SUBJECT) is None


def test_bad_data_behind_a_success_frees_at_once_the_sender_is_done() -> None:
    bench, subject, _ = subject_lands(D + 1, KVPoll.Success)  # T beyond A0, yet Success
    assert type(subject.error) is SizeMismatch
    assert subject.fenced == () and bench.allocator.fenced == {} and bench.queue.get(SUBJECT) is None


def test_bad_data_behind_a_transferring_is_fenced_the_sender_may_still_write() -> None:
    bench, subject, _ = subject_lands(0, KVPoll.Transferring)
    assert type(subject.error) is CorruptAux
    assert subject.fenced == (0, 1) and bench.queue.get(SUBJECT) is subject


def test_a_fenced_room_cannot_be_added_again_until_its_fence_lifts() -> None:
    bench, _ = aborted_while_writing(State.TRANSFERRING)
    bench.step()
    with pytest.raises(ValueError, match="already in the queue"):
        bench.queue.add(SUBJECT, FakeLink())
    bench.links[SUBJECT].status = int(KVPoll.Failed)
    bench.step()
    bench.add(SUBJECT)
