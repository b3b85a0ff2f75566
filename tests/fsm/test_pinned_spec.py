"""Behaviour of the core that the protocol tests pass through without pinning down: the spec loader.

Each test in the test_pinned_*.py files states one observable behaviour of ``fsm/`` that a plausible slip
in the code would change (a boundary off by one, an argument dropped, a strict check made lenient) and
that the controller, spec and machine tests above it do not distinguish. spec/VERIFICATION.md §9 lists
what mutation testing of ``fsm/`` finds. The files go by the part of the core they pin down: the spec
loader (here: how an overlay combines with the spec it changes, and what a fresh parse of the packaged
text yields or refuses), the documents drawn from the spec (test_pinned_documents.py), the queue and its
configuration (test_pinned_queue.py), the request (test_pinned_request.py) and the tensor-parallel ranks
(test_pinned_ranks.py).
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

import pytest
from support.spec_text import dump_toml, fresh_spec

from epd_receiver.fsm import KVPoll, ReceiverConfig, SpecError, State, load_spec
from epd_receiver.fsm.spec import default_spec_text

# ---- overlays -----------------------------------------------------------------------------------------


def test_an_overlay_replaces_only_the_transition_with_the_same_conditions() -> None:
    """payload_landed from TRANSFERRING has a warm-up transition (conditions) and a normal one (none)."""
    overlay = {
        "transitions": [
            {
                "trigger": "payload_landed",
                "source": "TRANSFERRING",
                "dest": "SUCCESS",
                "unless": ["is_warmup"],
                "reads": ["aux", "data"],
                "actions": ["learn_total", "check_total", "expect_no_remainder", "gather_landed"],
            }
        ]
    }
    spec = load_spec(overlay=overlay)
    landed = [t for t in spec.transitions if t.trigger == "payload_landed" and t.sources == (State.TRANSFERRING,)]
    assert [t.conditions for t in landed] == [("is_warmup",), ()]
    assert landed[1].actions == ("learn_total", "check_total", "expect_no_remainder", "gather_landed")


def test_an_overlay_can_supply_the_transitions_a_base_spec_lacks() -> None:
    raw = tomllib.loads(default_spec_text())
    transitions = raw.pop("transitions")
    spec = load_spec(dump_toml(raw), overlay={"transitions": transitions})
    assert spec.transitions == load_spec().transitions


def test_a_loaded_spec_does_not_alias_its_overlay() -> None:
    """Variants keep their overlays as module constants: loading one must not tie the spec to them."""
    overlay: dict[str, Any] = {"notes": {"reviewers": {"names": ["a"]}}}
    spec = load_spec(overlay=overlay)
    overlay["notes"]["reviewers"]["names"].append("b")
    assert spec.raw["notes"] == {"reviewers": {"names": ["a"]}}


# ---- parsing the spec afresh --------------------------------------------------------------------------
# load_spec() hands out the packaged spec parsed once per process; these parse its text again.


def test_a_fresh_parse_of_the_packaged_text_is_the_packaged_spec() -> None:
    assert fresh_spec() == load_spec()


def test_a_fresh_parse_keeps_every_doc_of_the_text() -> None:
    raw = tomllib.loads(default_spec_text())
    spec = fresh_spec()
    for table, parsed in (("events", spec.events), ("actions", spec.actions), ("guards", spec.guards)):
        assert parsed == {name: body["doc"] for name, body in raw[table].items()}, table
        assert all(parsed.values()), table
    assert spec.state_docs == {State[name]: body["doc"] for name, body in raw["states"].items()}


def test_a_fresh_parse_has_the_packaged_machine_causes_and_deadlines() -> None:
    from epd_receiver.fsm import errors
    from epd_receiver.fsm.spec import Guards, PollOutcome, TimeoutSpec

    spec = fresh_spec()
    assert (spec.initial, spec.terminal, spec.on_error) == (
        State.BOOTSTRAPPING,
        frozenset({State.SUCCESS, State.FAILED}),
        "fail",
    )
    assert spec.causes == {
        "timeout": errors.TimedOut,
        "sender_failed": errors.SenderFailed,
        "premature_status": errors.ProtocolViolation,
        "status_regression": errors.ProtocolViolation,
        "unknown_status": errors.ProtocolViolation,
        "transport_failed": errors.TransportFailed,
    }
    assert spec.unknown_poll == PollOutcome("fail", "unknown_status")
    assert spec.link_error_poll == PollOutcome("fail", "transport_failed")
    stopped = PollOutcome("sender_stopped", enabled_if=(Guards(("holds_fence", "senders_stopped")),))
    assert spec.unknown_polls == {State.FAILED: stopped} and spec.link_error_polls == {State.FAILED: stopped}
    assert spec.timeouts[State.FAILED] == TimeoutSpec("drain_timeout_s", "drain_expired")
    assert spec.timeouts[State.RESUMING] == TimeoutSpec("resume_timeout_s", "fail", "timeout")
    assert len(spec.timeouts) == 6
    assert spec.transitions_from(State.SUCCESS)[0].internal
    assert spec.polls[State.FAILED][KVPoll.Success] == stopped


def test_an_entry_without_a_doc_has_an_empty_one() -> None:
    raw = tomllib.loads(default_spec_text())
    raw["states"]["FAILED"] = {}
    for table in ("events", "actions", "guards"):
        raw[table][f"undocumented_{table}"] = {"note": "no doc"}
    spec = load_spec(dump_toml(raw))
    assert spec.state_docs[State.FAILED] == ""
    assert (spec.events["undocumented_events"], spec.actions["undocumented_actions"]) == ("", "")
    assert spec.guards["undocumented_guards"] == ""


# ---- what the loader refuses, and saying where --------------------------------------------------------


def test_a_spec_without_states_is_refused_as_inconsistent() -> None:
    raw = tomllib.loads(default_spec_text())
    del raw["states"]
    with pytest.raises(SpecError, match=r"states in spec \[\] differ"):
        load_spec(dump_toml(raw))


@pytest.mark.parametrize("table", ["events", "actions", "guards", "transitions", "causes", "polls"])
def test_a_spec_missing_a_whole_table_is_refused_as_inconsistent(table: str) -> None:
    raw = tomllib.loads(default_spec_text())
    del raw[table]
    with pytest.raises(SpecError):
        load_spec(dump_toml(raw))


def test_a_spec_that_says_nothing_of_a_link_error_is_refused() -> None:
    raw = tomllib.loads(default_spec_text())
    del raw["polls"]["link_error"]
    with pytest.raises(SpecError, match=r"^polls\.link_error must be 'fail:CAUSE'"):
        load_spec(dump_toml(raw))


def _one_transition(**changes: Any) -> dict[str, Any]:
    """An overlay that replaces BOOTSTRAPPING's handshake_done transition with ``changes`` applied."""
    transition = {"trigger": "handshake_done", "source": "BOOTSTRAPPING", "dest": "WAITING_FOR_INPUT", **changes}
    return {"transitions": [transition]}


@pytest.mark.parametrize(
    ("overlay", "where"),
    [
        ({"machine": {"terminal": ["SUCCESS", "LIMBO"]}}, "machine.terminal: unknown state 'LIMBO'"),
        ({"polls": {"unknown": "fail:gremlins"}}, "polls.unknown: cause 'gremlins' not declared"),
        ({"polls": {"link_error": "fail:gremlins"}}, "polls.link_error: cause 'gremlins' not declared"),
        ({"polls": {"LIMBO": {"Failed": "noop"}}}, "polls: unknown state 'LIMBO'"),
        ({"polls": {"RESUMING": {"Sucess": "noop"}}}, "polls.RESUMING: 'Sucess' is not a KVPoll value"),
        ({"polls": {"RESUMING": {"Failed": "fail:gremlins"}}}, "polls.RESUMING.Failed: cause 'gremlins' not declared"),
        ({"polls": {"RESUMING": {"unknown": "fail:gremlins"}}}, "polls.RESUMING.unknown: cause 'gremlins'"),
        ({"machine": {"initial": "LIMBO"}}, "machine.initial: unknown state 'LIMBO'"),
        ({"timeouts": {"LIMBO": "resume_timeout_s"}}, "timeouts: unknown state 'LIMBO'"),
        ({"timeouts": {"RESUMING": {"event": "fail"}}}, "timeouts.RESUMING: a field name"),
        (_one_transition(trigger="teleport"), "transition 'teleport': event not declared under [events]"),
        (_one_transition(reads="aux"), "transition 'handshake_done': reads is a list"),
        (
            _one_transition(reads=["disk"]),
            "transition 'handshake_done': undeclared actions [], guards [], reads ['disk']",
        ),
        (_one_transition(source="LIMBO"), "transition 'handshake_done': unknown state 'LIMBO'"),
        (_one_transition(dest="LIMBO"), "transition 'handshake_done': unknown state 'LIMBO'"),
        (
            {"polls": {"RESUMING": {"Failed": "fail"}}},
            "polls.RESUMING.Failed: 'fail' needs a cause: write 'fail:CAUSE'",
        ),
        ({"polls": {"WAITING_FOR_BLOCKS": {"Success": "payload_landed"}}}, "polls.WAITING_FOR_BLOCKS.Success: no tr"),
        (
            {"polls": {"RESUMING": {"Transferring": "round_landed if sender_progressed"}}},
            "polls.RESUMING.Transferring: 'round_landed if sender_progressed': a cell names noop, one event",
        ),
        (
            {"polls": {"FAILED": {"unknown": "fail:unknown_status"}}},
            "polls.FAILED.unknown: a terminal",
        ),
        (
            {"polls": {"RESUMING": {"unknown": "handshake_done"}}},
            "polls.RESUMING.unknown: no transition",
        ),
        ({"timeouts": {"SUCCESS": "transfer_timeout_s"}}, "timeouts.SUCCESS: no transition for 'fail'"),
    ],
    ids=[
        "terminal",
        "unknown",
        "link_error",
        "state",
        "value",
        "cell",
        "special-cell",
        "initial",
        "timeouts",
        "timeout-table",
        "event",
        "reads-string",
        "reads-kind",
        "source",
        "dest",
        "fail-without-cause",
        "cell-fires-nothing",
        "cell-guard",
        "terminal-special",
        "special-fires-nothing",
        "deadline-fires-nothing",
    ],
)
def test_a_spec_error_says_where_it_is(overlay: dict[str, Any], where: str) -> None:
    with pytest.raises(SpecError, match=f"^{re.escape(where)}"):
        load_spec(overlay=overlay)


def test_a_state_s_own_rule_for_a_value_outside_kvpoll_fails_with_its_cause() -> None:
    from epd_receiver.fsm.spec import PollOutcome

    spec = load_spec(overlay={"polls": {"RESUMING": {"unknown": "fail:premature_status"}}})
    assert spec.unknown_poll_in(State.RESUMING) == PollOutcome("fail", "premature_status")
    assert spec.unknown_poll_in(State.TRANSFERRING) == PollOutcome("fail", "unknown_status")


def test_a_spec_without_deadlines_loads_and_waits_forever() -> None:
    raw = tomllib.loads(default_spec_text())
    del raw["timeouts"]
    spec = load_spec(dump_toml(raw))
    assert spec.timeouts == {}
    from epd_receiver.fsm.config import deadlines

    assert deadlines(spec, ReceiverConfig()) == {}


def test_deadlines_without_a_timeout_cause_are_refused_saying_so() -> None:
    raw = tomllib.loads(default_spec_text())
    del raw["causes"]["timeout"]
    with pytest.raises(SpecError, match=r"^timeouts need a `timeout` entry under \[causes\]$"):
        load_spec(dump_toml(raw))


def test_an_unknown_status_treated_as_harmless_is_refused_saying_why() -> None:
    expected = "polls.unknown must be 'fail:CAUSE': an unknown status is never harmless"
    with pytest.raises(SpecError, match=f"^{re.escape(expected)}$"):
        load_spec(overlay={"polls": {"unknown": "noop"}})
