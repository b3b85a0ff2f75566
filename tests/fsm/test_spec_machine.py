"""The machine spec/receiver.toml declares: its states, the [machine] table and the transitions.

The packaged spec's states and transitions are what the controller and the queue are built from; each
inconsistency among them (an unknown state, an undeclared event, action, guard or read kind, a way out
of a terminal state, an allocation order other than the states that take grants) is refused at load
time with a SpecError naming it.
"""

from __future__ import annotations

from typing import Any

import pytest
from support.spec_text import load_edited

from epd_receiver.fsm import SpecError, State
from epd_receiver.fsm.spec import ReceiverSpec, load_spec


@pytest.fixture(scope="module")
def spec() -> ReceiverSpec:
    return load_spec()


# ---- the packaged spec ------------------------------------------------------------------------------


def test_the_spec_names_the_states_in_declaration_order_and_what_the_queue_derives(spec: ReceiverSpec) -> None:
    assert spec.states == tuple(State)
    assert spec.allocation_order == (State.WAITING_FOR_BLOCKS, State.WAITING_FOR_INPUT)
    assert spec.held_until_release == frozenset({State.SUCCESS})


def test_only_transitions_that_copy_landed_data_open_read_windows(spec: ReceiverSpec) -> None:
    readers = {(t.trigger, t.sources) for t in spec.transitions if t.reads}
    assert readers == {
        ("first_chunk_landed", (State.TRANSFERRING,)),
        ("payload_landed", (State.TRANSFERRING,)),
        ("payload_landed", (State.RESUMING,)),
        ("round_landed", (State.RESUMING,)),  # only with sender progress, and never the aux row
    }
    for t in spec.transitions:
        assert t.reads <= {"aux", "data"}
        if t.sources != (State.TRANSFERRING,):
            assert "aux" not in t.reads, "only A0's transitions may read the aux row"


# ---- states and the [machine] table -----------------------------------------------------------------


def test_a_state_missing_from_the_spec_is_refused() -> None:
    def drop_resuming(raw: dict[str, Any]) -> None:
        del raw["states"]["RESUMING"]

    with pytest.raises(SpecError, match="states in spec"):
        load_edited(drop_resuming)


def test_a_state_the_code_does_not_know_is_refused() -> None:
    with pytest.raises(SpecError, match="states in spec"):
        load_spec(overlay={"states": {"PAUSED": {"doc": "not in fsm.states.State"}}})


def test_an_on_error_event_that_is_not_declared_is_refused() -> None:
    with pytest.raises(SpecError, match="on_error"):
        load_spec(overlay={"machine": {"on_error": "explode"}})


def test_an_unknown_initial_state_is_refused() -> None:
    with pytest.raises(SpecError, match=r"machine\.initial"):
        load_spec(overlay={"machine": {"initial": "NOWHERE"}})


@pytest.mark.parametrize(
    "order",
    [
        ["WAITING_FOR_INPUT"],
        ["WAITING_FOR_BLOCKS", "WAITING_FOR_INPUT", "TRANSFERRING"],
        ["WAITING_FOR_BLOCKS", "WAITING_FOR_INPUT", "WAITING_FOR_BLOCKS"],
        [],
    ],
    ids=["missing", "extra", "twice", "none"],
)
def test_an_allocation_order_other_than_the_states_that_take_grants_is_refused(order: list[str]) -> None:
    expected = (
        r"^machine\.allocation_order .* must list, once each, the states that take blocks_granted or "
        r"warmup_admitted: \['WAITING_FOR_BLOCKS', 'WAITING_FOR_INPUT'\]$"
    )
    with pytest.raises(SpecError, match=expected):
        load_spec(overlay={"machine": {"allocation_order": order}})


# ---- transitions ------------------------------------------------------------------------------------


def test_a_transition_naming_an_undeclared_action_is_refused() -> None:
    overlay = {
        "transitions": [
            {
                "trigger": "blocks_granted",
                "source": "WAITING_FOR_INPUT",
                "dest": "TRANSFERRING",
                "actions": ["take_blocks", "send_init", "teleport"],
            }
        ]
    }
    with pytest.raises(SpecError, match="teleport"):
        load_spec(overlay=overlay)


def test_a_transition_naming_an_undeclared_guard_is_refused() -> None:
    overlay = {
        "transitions": [
            {
                "trigger": "handshake_done",
                "source": "BOOTSTRAPPING",
                "dest": "WAITING_FOR_INPUT",
                "conditions": ["is_lucky"],
            }
        ]
    }
    with pytest.raises(SpecError, match="is_lucky"):
        load_spec(overlay=overlay)


def test_an_undeclared_guard_in_unless_is_refused() -> None:
    overlay = {
        "transitions": [
            {
                "trigger": "handshake_done",
                "source": "BOOTSTRAPPING",
                "dest": "WAITING_FOR_INPUT",
                "unless": ["no_such_guard"],
            }
        ]
    }
    with pytest.raises(SpecError, match="no_such_guard"):
        load_spec(overlay=overlay)


def test_a_transition_on_an_undeclared_event_is_refused() -> None:
    overlay = {"transitions": [{"trigger": "teleport", "source": "BOOTSTRAPPING", "dest": "SUCCESS"}]}
    with pytest.raises(SpecError, match="event not declared"):
        load_spec(overlay=overlay)


@pytest.mark.parametrize("reads", [["disk"], ["aux", "metadata"], ["AUX"]])
def test_a_read_kind_other_than_aux_or_data_is_refused(reads: list[str]) -> None:
    overlay = {
        "transitions": [
            {
                "trigger": "payload_landed",
                "source": "RESUMING",
                "dest": "SUCCESS",
                "reads": reads,
                "actions": ["gather_landed"],
            }
        ]
    }
    with pytest.raises(SpecError, match="reads"):
        load_spec(overlay=overlay)


def test_a_transition_to_an_unknown_state_is_refused() -> None:
    overlay = {"transitions": [{"trigger": "handshake_done", "source": "BOOTSTRAPPING", "dest": "LIMBO"}]}
    with pytest.raises(SpecError, match="LIMBO"):
        load_spec(overlay=overlay)


def test_a_transition_that_leaves_a_terminal_state_is_refused() -> None:
    overlay = {"transitions": [{"trigger": "release", "source": "SUCCESS", "dest": "FAILED"}]}
    with pytest.raises(SpecError, match=r"^transition 'release': would leave the terminal state SUCCESS$"):
        load_spec(overlay=overlay)
