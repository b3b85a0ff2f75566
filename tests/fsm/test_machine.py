"""The transitions Machine that drives every request is exactly the one spec/receiver.toml declares.

The spec is the single source of states, transitions, read windows and actions; the Machine is built from
it. If the builder dropped a transition, added one, reordered actions, opened a read window after an
action that reads, or left transitions' automatic ``to_*`` triggers on, the controller would behave in a
way no reviewer of the spec could see. These tests compare the built Machine with the spec both ways.
"""

from __future__ import annotations

import pytest
from transitions import Machine, Transition

from epd_receiver.fsm import ReceiverRequest, ReceiverSpec, State, load_spec
from epd_receiver.fsm.machine import ENTRY_STAMP, WINDOW_CLOSER, WINDOW_OPENERS, build_machine, check_implemented
from epd_receiver.fsm.spec import TransitionSpec

SPEC: ReceiverSpec = load_spec()
MACHINE: Machine = build_machine(SPEC, ReceiverRequest)

# (trigger, source, dest, guards) with dest None for an internal transition; "!g" is `unless g`
Edge = tuple[str, str, str | None, tuple[str, ...]]


def spec_guards(t: TransitionSpec) -> tuple[str, ...]:
    return tuple(t.conditions) + tuple(f"!{g}" for g in t.unless)


def machine_guards(t: Transition) -> tuple[str, ...]:
    return tuple(c.func if c.target else f"!{c.func}" for c in t.conditions)


def spec_edges() -> dict[Edge, TransitionSpec]:
    return {
        (t.trigger, source.name, None if t.internal else t.dest.name, spec_guards(t)): t
        for t in SPEC.transitions
        for source in t.sources
    }


def machine_transitions() -> list[tuple[str, Transition]]:
    return [
        (trigger, transition)
        for trigger, event in MACHINE.events.items()
        for transitions in event.transitions.values()
        for transition in transitions
    ]


def machine_edges() -> list[Edge]:
    return [(trigger, t.source, t.dest, machine_guards(t)) for trigger, t in machine_transitions()]


def test_every_spec_transition_is_in_the_machine() -> None:
    assert set(spec_edges()) <= set(machine_edges())


def test_the_machine_has_no_transition_the_spec_does_not_declare() -> None:
    edges = machine_edges()
    assert len(edges) == len(set(edges)), "a transition is registered twice"
    assert set(edges) == set(spec_edges())


def test_the_machine_has_no_event_the_spec_does_not_declare() -> None:
    assert set(MACHINE.events) == {t.trigger for t in SPEC.transitions}
    assert set(MACHINE.events) <= set(SPEC.events)


@pytest.mark.parametrize("edge", sorted(spec_edges(), key=str), ids=lambda e: f"{e[0]}:{e[1]}")
def test_before_callbacks_open_the_spec_reads_then_run_the_actions_in_order(edge: Edge) -> None:
    spec_transition = spec_edges()[edge]
    trigger, source, _, guards = edge
    (transition,) = [t for t in MACHINE.events[trigger].transitions[source] if machine_guards(t) == guards]
    openers = [WINDOW_OPENERS[kind] for kind in spec_transition.reads]

    assert sorted(transition.before[: len(openers)]) == sorted(openers)
    assert transition.before[len(openers) :] == list(spec_transition.actions)
    assert transition.after == []
    assert transition.prepare == []
    assert machine_guards(transition) == spec_guards(spec_transition)


def test_transitions_without_reads_open_no_window() -> None:
    for trigger, transition in machine_transitions():
        reads = spec_edges()[(trigger, transition.source, transition.dest, machine_guards(transition))].reads
        opened = {kind for kind, opener in WINDOW_OPENERS.items() if opener in transition.before}
        assert opened == set(reads), f"{trigger} from {transition.source}"


def test_internal_transitions_are_exactly_the_spec_internal_ones() -> None:
    internal = {(t.trigger, s.name) for t in SPEC.transitions if t.internal for s in t.sources}
    assert {(trigger, t.source) for trigger, t in machine_transitions() if t.dest is None} == internal
    assert internal == {("release", "SUCCESS"), ("sender_stopped", "FAILED"), ("drain_expired", "FAILED")}


def test_every_read_window_is_closed_when_an_event_finishes() -> None:
    assert MACHINE.finalize_event == [WINDOW_CLOSER]
    assert MACHINE.before_state_change == [] and MACHINE.after_state_change == [ENTRY_STAMP]
    assert MACHINE.prepare_event == []


def test_machine_states_initial_and_strictness_match_the_spec() -> None:
    assert list(MACHINE.states) == [s.name for s in State]
    assert MACHINE.initial == SPEC.initial.name
    assert MACHINE.auto_transitions is False
    assert MACHINE.ignore_invalid_triggers is False
    assert MACHINE.send_event is True


def test_a_built_machine_drives_no_model_until_a_request_is_added() -> None:
    machine = build_machine(SPEC, ReceiverRequest)
    assert machine.models == []
    assert not hasattr(machine, "state")  # not even itself: the Machine is shared, it has no state of its own


def test_a_model_gets_no_automatic_to_state_triggers() -> None:
    machine = build_machine(SPEC, ReceiverRequest)
    model = ReceiverRequest.__new__(ReceiverRequest)  # no ports needed to inspect what the Machine binds
    machine.add_model(model)

    assert model.state is SPEC.initial
    assert not [name for name in dir(model) if name.startswith("to_")]
    for state in State:
        assert f"to_{state.name}" not in machine.events


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.name)
def test_triggers_from_each_state_are_the_spec_triggers(state: State) -> None:
    expected = {t.trigger for t in SPEC.transitions_from(state)}
    assert set(MACHINE.get_triggers(state.name)) == expected


def test_terminal_states_only_take_the_spec_terminal_triggers() -> None:
    assert sorted(MACHINE.get_triggers(State.FAILED.name)) == ["drain_expired", "sender_stopped"]
    assert MACHINE.get_triggers(State.SUCCESS.name) == ["release"]


def test_every_action_and_window_method_the_spec_names_exists_on_the_request() -> None:
    check_implemented(SPEC, ReceiverRequest)
    names = set(SPEC.actions) | set(WINDOW_OPENERS.values()) | {WINDOW_CLOSER}
    for name in names:
        assert callable(getattr(ReceiverRequest, name, None)), name


def test_every_action_the_spec_declares_is_used_by_some_transition() -> None:
    used = {action for t in SPEC.transitions for action in t.actions}
    assert used == set(SPEC.actions)
