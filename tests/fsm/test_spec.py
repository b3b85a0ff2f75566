"""fsm.spec.load_spec: spec/receiver.toml is the single source of the controller's behaviour.

The loader is the only thing standing between a typo in the TOML and a controller that silently takes a
wrong transition, ignores a status, or treats an unknown status as harmless. These tests check that the
packaged spec loads and is complete, and that each kind of inconsistency is refused at load time with a
SpecError, as is a model class that does not implement an action the spec names.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from epd_receiver.fsm import KVPoll, ReceiverRequest, SpecError, State, errors
from epd_receiver.fsm.machine import ENTRY_STAMP, WINDOW_CLOSER, WINDOW_OPENERS, build_machine, check_implemented
from epd_receiver.fsm.spec import Guards, ReceiverSpec, default_spec_text, load_spec

# ---- a tiny TOML writer, enough for the spec's shape ------------------------------------------------


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def dump_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Scalars and plain arrays first, then sub-tables, then arrays of tables, each under its full header."""
    lines = [
        f"{key} = {_value(value)}"
        for key, value in data.items()
        if not isinstance(value, Mapping) and not _is_table_array(value)
    ]
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            lines += ["", f"[{name}]", dump_toml(value, name)]
        elif _is_table_array(value):
            for item in value:
                lines += ["", f"[[{name}]]", dump_toml(item, name)]
    return "\n".join(lines)


def default_raw() -> dict[str, Any]:
    return tomllib.loads(default_spec_text())


def load_edited(edit: Callable[[dict[str, Any]], None]) -> ReceiverSpec:
    """Parse the packaged spec, apply ``edit`` to the raw tables, write it back and load the result."""
    raw = default_raw()
    edit(raw)
    return load_spec(dump_toml(raw))


@pytest.fixture(scope="module")
def spec() -> ReceiverSpec:
    return load_spec()


# ---- the helper itself ------------------------------------------------------------------------------


def test_toml_writer_round_trips_the_packaged_spec() -> None:
    raw = default_raw()
    assert tomllib.loads(dump_toml(raw)) == raw


def test_an_unedited_rewrite_loads_to_the_same_spec(spec: ReceiverSpec) -> None:
    rewritten = load_edited(lambda raw: None)
    assert rewritten.transitions == spec.transitions
    assert rewritten.polls == spec.polls
    assert rewritten.causes == spec.causes


# ---- the packaged spec ------------------------------------------------------------------------------


def test_packaged_spec_loads_with_the_expected_shape(spec: ReceiverSpec) -> None:
    assert spec.initial is State.BOOTSTRAPPING
    assert spec.terminal == frozenset({State.SUCCESS, State.FAILED})
    assert spec.on_error == "fail"
    assert set(spec.state_docs) == set(State)
    assert spec.unknown_poll.event == "fail"
    assert spec.unknown_poll.cause == "unknown_status"


def test_load_spec_accepts_text_and_path_sources(spec: ReceiverSpec, tmp_path: Path) -> None:
    path = tmp_path / "receiver.toml"
    path.write_text(default_spec_text(), encoding="utf-8")
    assert load_spec(path).transitions == spec.transitions
    assert load_spec(default_spec_text()).transitions == spec.transitions


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


def test_a_terminal_poll_table_that_could_leave_the_state_is_refused() -> None:
    overlay = {"polls": {"SUCCESS": {v.name: "noop" for v in KVPoll} | {"Failed": "fail:sender_failed"}}}
    with pytest.raises(SpecError, match="would leave the terminal state SUCCESS"):
        load_spec(overlay={**overlay, "transitions": [{"trigger": "fail", "source": "SUCCESS", "dest": "FAILED"}]})


def test_a_terminal_state_cannot_fail_on_an_unknown_status() -> None:
    with pytest.raises(SpecError, match="a terminal state cannot fail"):
        load_spec(overlay={"polls": {"FAILED": {"unknown": "fail:unknown_status"}}})


def test_every_poll_failure_cause_maps_to_a_receiver_error(spec: ReceiverSpec) -> None:
    for cls in spec.causes.values():
        assert issubclass(cls, errors.ReceiverError)


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


# ---- inconsistencies the loader refuses -------------------------------------------------------------


def test_a_state_missing_from_the_spec_is_refused() -> None:
    def drop_resuming(raw: dict[str, Any]) -> None:
        del raw["states"]["RESUMING"]

    with pytest.raises(SpecError, match="states in spec"):
        load_edited(drop_resuming)


def test_a_state_the_code_does_not_know_is_refused() -> None:
    with pytest.raises(SpecError, match="states in spec"):
        load_spec(overlay={"states": {"PAUSED": {"doc": "not in fsm.states.State"}}})


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


@pytest.mark.parametrize("value", [v.name for v in KVPoll])
def test_a_poll_table_missing_a_value_is_refused(value: str) -> None:
    def drop(raw: dict[str, Any]) -> None:
        del raw["polls"]["RESUMING"][value]

    with pytest.raises(SpecError, match="must map every KVPoll value"):
        load_edited(drop)


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


def test_a_terminal_poll_table_inherits_no_failing_unknown_rule() -> None:
    overlay = {"polls": {"SUCCESS": {v.name: "noop" for v in KVPoll}}}
    with pytest.raises(SpecError, match="a terminal state cannot fail"):
        load_spec(overlay=overlay)


@pytest.mark.parametrize("class_name", ["NoSuchError", "OwnershipError", "ContractError", "Room"])
def test_a_cause_that_is_not_a_receiver_error_class_is_refused(class_name: str) -> None:
    with pytest.raises(SpecError, match="is not a ReceiverError"):
        load_spec(overlay={"causes": {"sender_failed": class_name}})


def test_a_poll_failure_with_an_undeclared_cause_is_refused() -> None:
    overlay = {"polls": {"RESUMING": {"Failed": "fail:gremlins"}}}
    with pytest.raises(SpecError, match="gremlins"):
        load_spec(overlay=overlay)


def test_an_unknown_status_treated_as_noop_is_refused() -> None:
    with pytest.raises(SpecError, match=r"polls\.unknown must be"):
        load_spec(overlay={"polls": {"unknown": "noop"}})


def test_an_unknown_status_left_out_defaults_to_noop_and_is_refused() -> None:
    def drop(raw: dict[str, Any]) -> None:
        del raw["polls"]["unknown"]

    with pytest.raises(SpecError, match=r"polls\.unknown must be"):
        load_edited(drop)


def test_a_poll_table_with_a_misspelt_value_name_is_refused_with_spec_error() -> None:
    with pytest.raises(SpecError):
        load_spec(overlay={"polls": {"RESUMING": {"Sucess": "payload_landed"}}})


def test_a_poll_failure_without_a_cause_is_refused() -> None:
    with pytest.raises(SpecError):
        load_spec(overlay={"polls": {"RESUMING": {"Failed": "fail"}}})


@pytest.mark.parametrize("outcome", ["handshake_done", "fail"])
def test_an_unknown_status_that_does_not_fail_with_a_cause_is_refused(outcome: str) -> None:
    with pytest.raises(SpecError):
        load_spec(overlay={"polls": {"unknown": outcome}})


def test_an_on_error_event_that_is_not_declared_is_refused() -> None:
    with pytest.raises(SpecError, match="on_error"):
        load_spec(overlay={"machine": {"on_error": "explode"}})


def test_an_unknown_initial_state_is_refused() -> None:
    with pytest.raises(SpecError, match=r"machine\.initial"):
        load_spec(overlay={"machine": {"initial": "NOWHERE"}})


def test_a_valid_overlay_changes_only_what_it_names(spec: ReceiverSpec) -> None:
    same = load_spec(overlay={"polls": {"WAITING_FOR_BLOCKS": {"Success": "fail:premature_status"}}})
    assert same.polls == spec.polls

    overlay = {"polls": {"TRANSFERRING": {"WaitingForInput": "fail:premature_status"}}}
    variant = load_spec(overlay=overlay)
    assert variant.polls[State.TRANSFERRING][KVPoll.WaitingForInput].cause == "premature_status"
    assert variant.polls[State.RESUMING] == spec.polls[State.RESUMING]
    assert variant.transitions == spec.transitions


# ---- the code must implement what the spec names ----------------------------------------------------


def _model_with(names: set[str]) -> type:
    def method(self: object, event: object) -> None:
        return None

    return type("PartialModel", (), dict.fromkeys(names, method))


def _needed(spec: ReceiverSpec) -> set[str]:
    return set(spec.actions) | set(spec.guards) | set(WINDOW_OPENERS.values()) | {WINDOW_CLOSER, ENTRY_STAMP}


def test_receiver_request_implements_the_packaged_spec(spec: ReceiverSpec) -> None:
    check_implemented(spec, ReceiverRequest)


def test_a_model_with_every_named_method_passes(spec: ReceiverSpec) -> None:
    check_implemented(spec, _model_with(_needed(spec)))


@pytest.mark.parametrize(
    "missing",
    sorted(load_spec().actions) + sorted(WINDOW_OPENERS.values()) + [WINDOW_CLOSER, ENTRY_STAMP],
)
def test_a_model_lacking_a_named_method_is_refused(spec: ReceiverSpec, missing: str) -> None:
    model = _model_with(_needed(spec) - {missing})
    with pytest.raises(SpecError, match=missing):
        check_implemented(spec, model)
    with pytest.raises(SpecError, match=missing):
        build_machine(spec, model)


def test_a_non_callable_attribute_does_not_count_as_an_action(spec: ReceiverSpec) -> None:
    model = _model_with(_needed(spec) - {"send_init"})
    model.send_init = "not a method"  # type: ignore[attr-defined]
    with pytest.raises(SpecError, match="send_init"):
        check_implemented(spec, model)


def test_an_action_added_to_the_spec_but_not_to_receiver_request_is_refused() -> None:
    variant = load_spec(
        overlay={
            "actions": {"teleport": {"doc": "an action no model implements"}},
            "transitions": [
                {
                    "trigger": "handshake_done",
                    "source": "BOOTSTRAPPING",
                    "dest": "WAITING_FOR_INPUT",
                    "actions": ["teleport"],
                }
            ],
        }
    )
    with pytest.raises(SpecError, match="teleport"):
        check_implemented(variant, ReceiverRequest)


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


# ---- what the queue derives from the spec -----------------------------------------------------------


def test_the_spec_names_the_states_in_declaration_order_and_what_the_queue_derives(spec: ReceiverSpec) -> None:
    assert spec.states == tuple(State)
    assert spec.allocation_order == (State.WAITING_FOR_BLOCKS, State.WAITING_FOR_INPUT)
    assert spec.held_until_release == frozenset({State.SUCCESS})


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


def test_a_transition_that_leaves_a_terminal_state_is_refused() -> None:
    overlay = {"transitions": [{"trigger": "release", "source": "SUCCESS", "dest": "FAILED"}]}
    with pytest.raises(SpecError, match=r"^transition 'release': would leave the terminal state SUCCESS$"):
        load_spec(overlay=overlay)
