"""fsm.spec.load_spec: spec/receiver.toml is the single source of the controller's behaviour.

The loader is the only thing standing between a typo in the TOML and a controller that silently takes a
wrong transition, ignores a status, or treats an unknown status as harmless. These tests check that the
packaged spec loads and is complete, and that a model class that does not implement an action the spec
names is refused. test_spec_machine.py (states and transitions) and test_spec_polls.py (poll tables,
causes and deadlines) check that each kind of inconsistency is refused at load time with a SpecError,
editing the packaged spec with the TOML writer below.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from support.spec_text import default_raw, dump_toml, load_edited

from epd_receiver.fsm import ReceiverRequest, SpecError, State
from epd_receiver.fsm.machine import ENTRY_STAMP, WINDOW_CLOSER, WINDOW_OPENERS, build_machine, check_implemented
from epd_receiver.fsm.spec import ReceiverSpec, default_spec_text, load_spec


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
