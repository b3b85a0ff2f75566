"""The consistency checks the loader runs on a parsed spec; each refusal says where and why.

A spec that passes them cannot make the controller take a transition that depends on the file's order,
ignore a status, treat an unknown one as harmless, leave a terminal state, or fail to fail.
"""

from __future__ import annotations

from .errors import SpecError
from .kvpoll import KVPoll
from .spec import ALLOCATION_EVENTS, LINK_ERROR_KEY, ReceiverSpec, always_enabled
from .states import State


def check_spec(spec: ReceiverSpec) -> None:
    _check_terminal_stays(spec)
    _check_exclusive(spec)
    _check_error_event_total(spec)
    _check_allocation_order(spec)
    _check_polls(spec)


def _check_terminal_stays(spec: ReceiverSpec) -> None:
    """Nothing leaves a terminal state: a request there has been reported ended to the caller."""
    for t in spec.transitions:
        left = [s for s in t.sources if s in spec.terminal and not t.internal]
        if left:
            raise SpecError(f"transition {t.trigger!r}: would leave the terminal state {left[0].name}")


def _check_exclusive(spec: ReceiverSpec) -> None:
    """Transitions of one trigger and source exclude each other: some guard is in one's ``conditions`` and
    in the other's ``unless``. Then at most one is ever enabled, and their order in the file is moot."""
    transitions = spec.transitions
    for i, first in enumerate(transitions):
        for second in transitions[i + 1 :]:
            shared = [s for s in first.sources if s in second.sources]
            if first.trigger != second.trigger or not shared:
                continue
            if set(first.conditions) & set(second.unless) or set(second.conditions) & set(first.unless):
                continue
            raise SpecError(
                f"transitions of {first.trigger!r} from {shared[0].name} overlap: ({first}) and ({second}); "
                "give one a guard under `conditions` that the other has under `unless`"
            )


def _check_error_event_total(spec: ReceiverSpec) -> None:
    """The error event is taken from every state that is not terminal, whatever the guards answer: a
    failure that no transition takes would leave a request where it was, silently."""
    for state in spec.states:
        if state in spec.terminal:
            continue
        takes = tuple(t.guards for t in spec.transitions_from(state) if t.trigger == spec.on_error)
        if not takes or not always_enabled(takes):
            raise SpecError(f"{spec.on_error!r} from {state.name}: some answer of the guards takes no transition")


def _check_allocation_order(spec: ReceiverSpec) -> None:
    """The allocation pass serves exactly the states that take its events, each once."""
    takers = {s for t in spec.transitions if t.trigger in ALLOCATION_EVENTS for s in t.sources}
    order = spec.allocation_order
    if len(set(order)) != len(order) or set(order) != takers:
        raise SpecError(
            f"machine.allocation_order {[s.name for s in order]} must list, once each, the states that take "
            f"{' or '.join(ALLOCATION_EVENTS)}: {sorted(s.name for s in takers)}"
        )


def _check_polls(spec: ReceiverSpec) -> None:
    """Every polled state answers every KVPoll value with an event the state can take.

    A terminal state is polled only to learn that the sender stopped writing into blocks the request
    still fences, so its poll table and its deadline may fire internal transitions only: nothing can
    leave a terminal state.
    """
    for state in spec.states:
        table = spec.polls.get(state)
        if table is None and state in spec.terminal:
            continue
        if table is None or set(table) != set(KVPoll):
            raise SpecError(f"polls.{state.name}: must map every KVPoll value")
        for value, outcome in table.items():
            _check_fires(spec, state, outcome.event, f"polls.{state.name}.{value.name}")
        specials = {"unknown": spec.unknown_poll_in(state), LINK_ERROR_KEY: spec.link_error_in(state)}
        for key, outcome in specials.items():
            if state in spec.terminal and outcome.cause is not None:
                raise SpecError(f"polls.{state.name}.{key}: a terminal state cannot fail")
            _check_fires(spec, state, outcome.event, f"polls.{state.name}.{key}")
    for state, timeout in spec.timeouts.items():
        _check_fires(spec, state, timeout.event, f"timeouts.{state.name}")
    if any(t.cause for t in spec.timeouts.values()) and "timeout" not in spec.causes:
        raise SpecError("timeouts need a `timeout` entry under [causes]")
    if spec.unknown_poll.cause is None:
        raise SpecError("polls.unknown must be 'fail:CAUSE': an unknown status is never harmless")
    if spec.link_error_poll.cause is None:
        raise SpecError(f"polls.{LINK_ERROR_KEY} must be 'fail:CAUSE': a link that raised is never harmless")


def _check_fires(spec: ReceiverSpec, state: State, event: str | None, where: str) -> None:
    if event is None:
        return
    takes = [t for t in spec.transitions_from(state) if t.trigger == event]
    if not takes:
        raise SpecError(f"{where}: no transition for {event!r}")
