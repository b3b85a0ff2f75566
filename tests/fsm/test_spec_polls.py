"""What spec/receiver.toml says the controller does on each poll and at each deadline.

A poll table must map every KVPoll value of every polled state to an event that has a transition from
that state, every failure must name a declared cause that is a ReceiverError, an unknown status must
fail, and a terminal state may be polled only to lift its fence; a deadline names a config field and
fires an event the state can take. Each breach is refused at load time with a SpecError.
"""

from __future__ import annotations

from typing import Any

import pytest
from support.spec_text import load_edited

from epd_receiver.fsm import KVPoll, SpecError, State, errors
from epd_receiver.fsm.spec import Guards, ReceiverSpec, load_spec


@pytest.fixture(scope="module")
def spec() -> ReceiverSpec:
    return load_spec()


# ---- the packaged poll table ------------------------------------------------------------------------


@pytest.mark.parametrize("state", [s for s in State if s not in (State.SUCCESS, State.FAILED)], ids=str)
def test_every_non_terminal_state_maps_all_five_kvpoll_values(spec: ReceiverSpec, state: State) -> None:
    table = spec.polls[state]
    assert set(table) == set(KVPoll)
    assert len(table) == 5
    triggers = {t.trigger for t in spec.transitions_from(state)}
    for outcome in table.values():
        assert outcome.is_noop or outcome.event in triggers
        if outcome.cause is not None:
            assert outcome.cause in spec.causes


def test_only_failed_is_polled_among_terminal_states_and_only_to_lift_its_fence(spec: ReceiverSpec) -> None:
    assert set(spec.polls) & spec.terminal == {State.FAILED}
    internal = {t.trigger for t in spec.transitions_from(State.FAILED) if t.internal and t.dest is State.FAILED}
    outcomes = [*spec.polls[State.FAILED].values(), spec.unknown_poll_in(State.FAILED)]
    assert {o.event for o in outcomes} == {"sender_stopped"}
    stopped = Guards(conditions=("holds_fence", "senders_stopped"))
    assert {o.enabled_if for o in outcomes} == {(stopped,)}, "derived from the transition, quiet without evidence"
    assert "sender_stopped" in internal
    assert spec.unknown_poll_in(State.RESUMING) == spec.unknown_poll


def test_every_poll_failure_cause_maps_to_a_receiver_error(spec: ReceiverSpec) -> None:
    for cls in spec.causes.values():
        assert issubclass(cls, errors.ReceiverError)


def test_a_valid_overlay_changes_only_what_it_names(spec: ReceiverSpec) -> None:
    same = load_spec(overlay={"polls": {"WAITING_FOR_BLOCKS": {"Success": "fail:premature_status"}}})
    assert same.polls == spec.polls

    overlay = {"polls": {"TRANSFERRING": {"WaitingForInput": "fail:premature_status"}}}
    variant = load_spec(overlay=overlay)
    assert variant.polls[State.TRANSFERRING][KVPoll.WaitingForInput].cause == "premature_status"
    assert variant.polls[State.RESUMING] == spec.polls[State.RESUMING]
    assert variant.transitions == spec.transitions


# ---- poll tables the loader refuses -----------------------------------------------------------------


@pytest.mark.parametrize("value", [v.name for v in KVPoll])
def test_a_poll_table_missing_a_value_is_refused(value: str) -> None:
    def drop(raw: dict[str, Any]) -> None:
        del raw["polls"]["RESUMING"][value]

    with pytest.raises(SpecError, match="must map every KVPoll value"):
        load_edited(drop)


def test_a_poll_table_with_a_misspelt_value_name_is_refused_with_spec_error() -> None:
    with pytest.raises(SpecError):
        load_spec(overlay={"polls": {"RESUMING": {"Sucess": "payload_landed"}}})


def test_a_polled_state_without_a_poll_table_is_refused() -> None:
    def drop(raw: dict[str, Any]) -> None:
        del raw["polls"]["WAITING_FOR_BLOCKS"]

    with pytest.raises(SpecError, match="WAITING_FOR_BLOCKS"):
        load_edited(drop)


def test_a_poll_event_with_no_transition_from_that_state_is_refused() -> None:
    # payload_landed exists, but not from WAITING_FOR_BLOCKS.
    overlay = {"polls": {"WAITING_FOR_BLOCKS": {"Success": "payload_landed"}}}
    with pytest.raises(SpecError, match="no transition for 'payload_landed'"):
        load_spec(overlay=overlay)


def test_removing_the_transition_a_poll_event_needs_is_refused() -> None:
    overlay = {"transitions": [{"trigger": "handshake_done", "source": "BOOTSTRAPPING", "remove": True}]}
    with pytest.raises(SpecError, match="no transition for 'handshake_done'"):
        load_spec(overlay=overlay)


def test_a_terminal_poll_table_that_could_leave_the_state_is_refused() -> None:
    overlay = {"polls": {"SUCCESS": {v.name: "noop" for v in KVPoll} | {"Failed": "fail:sender_failed"}}}
    with pytest.raises(SpecError, match="would leave the terminal state SUCCESS"):
        load_spec(overlay={**overlay, "transitions": [{"trigger": "fail", "source": "SUCCESS", "dest": "FAILED"}]})


def test_a_terminal_state_cannot_fail_on_an_unknown_status() -> None:
    with pytest.raises(SpecError, match="a terminal state cannot fail"):
        load_spec(overlay={"polls": {"FAILED": {"unknown": "fail:unknown_status"}}})


def test_a_terminal_poll_table_inherits_no_failing_unknown_rule() -> None:
    overlay = {"polls": {"SUCCESS": {v.name: "noop" for v in KVPoll}}}
    with pytest.raises(SpecError, match="a terminal state cannot fail"):
        load_spec(overlay=overlay)


# ---- causes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("class_name", ["NoSuchError", "OwnershipError", "ContractError", "Room"])
def test_a_cause_that_is_not_a_receiver_error_class_is_refused(class_name: str) -> None:
    with pytest.raises(SpecError, match="is not a ReceiverError"):
        load_spec(overlay={"causes": {"sender_failed": class_name}})


def test_a_poll_failure_with_an_undeclared_cause_is_refused() -> None:
    overlay = {"polls": {"RESUMING": {"Failed": "fail:gremlins"}}}
    with pytest.raises(SpecError, match="gremlins"):
        load_spec(overlay=overlay)


def test_a_poll_failure_without_a_cause_is_refused() -> None:
    with pytest.raises(SpecError):
        load_spec(overlay={"polls": {"RESUMING": {"Failed": "fail"}}})


# ---- an unknown status ------------------------------------------------------------------------------


def test_an_unknown_status_treated_as_noop_is_refused() -> None:
    with pytest.raises(SpecError, match=r"polls\.unknown must be"):
        load_spec(overlay={"polls": {"unknown": "noop"}})


def test_an_unknown_status_left_out_defaults_to_noop_and_is_refused() -> None:
    def drop(raw: dict[str, Any]) -> None:
        del raw["polls"]["unknown"]

    with pytest.raises(SpecError, match=r"polls\.unknown must be"):
        load_edited(drop)


@pytest.mark.parametrize("outcome", ["handshake_done", "fail"])
def test_an_unknown_status_that_does_not_fail_with_a_cause_is_refused(outcome: str) -> None:
    with pytest.raises(SpecError):
        load_spec(overlay={"polls": {"unknown": outcome}})


# ---- deadlines --------------------------------------------------------------------------------------


def test_a_deadline_that_would_fail_a_terminal_state_is_refused() -> None:
    with pytest.raises(SpecError, match="no transition for 'fail'"):
        load_spec(overlay={"timeouts": {"SUCCESS": "transfer_timeout_s"}})


def test_a_deadline_table_names_a_field_and_an_event() -> None:
    with pytest.raises(SpecError, match="field"):
        load_spec(overlay={"timeouts": {"RESUMING": {"event": "fail"}}})


def test_deadlines_need_a_timeout_cause() -> None:
    with pytest.raises(SpecError, match="timeout"):
        load_edited(lambda r: r["causes"].pop("timeout"))


def test_a_deadline_naming_a_missing_config_field_is_refused() -> None:
    from epd_receiver.fsm.config import ReceiverConfig, deadlines

    spec = load_spec(overlay={"timeouts": {"RESUMING": "no_such_field_s"}})
    with pytest.raises(SpecError, match="no_such_field_s"):
        deadlines(spec, ReceiverConfig())
