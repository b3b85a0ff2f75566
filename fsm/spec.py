"""Load and check spec/receiver.toml, the single source of the controller's behaviour.

The loader turns the file into plain frozen data and refuses anything inconsistent, so that a mistake in
the spec fails at import time with the line of thought spelled out, not later as a strange transition.
"""

from __future__ import annotations

import copy
import functools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from . import errors
from .errors import SpecError
from .kvpoll import KVPoll
from .states import State

READ_KINDS = frozenset({"aux", "data"})
NOOP = "noop"
# Poll-table entries that are not KVPoll values: a value outside KVPoll, and a link that raised.
LINK_ERROR_KEY = "link_error"
SPECIAL_COLUMNS = ("unknown", LINK_ERROR_KEY)
FAIL_PREFIX = "fail:"


@dataclass(frozen=True, slots=True)
class TransitionSpec:
    trigger: str
    sources: tuple[State, ...]
    dest: State
    internal: bool
    reads: frozenset[str]
    actions: tuple[str, ...]
    conditions: tuple[str, ...]
    unless: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PollOutcome:
    """What one reduced poll value does in one state: nothing, an event, or a failure with a cause."""

    event: str | None = None
    cause: str | None = None
    guard: str | None = None

    @property
    def is_noop(self) -> bool:
        return self.event is None


@dataclass(frozen=True, slots=True)
class TimeoutSpec:
    """A state's deadline: the ReceiverConfig field that bounds it and the event fired when it passes."""

    field: str
    event: str
    cause: str | None = None  # set when the event is the error event: the request fails with this cause


@dataclass(frozen=True, slots=True)
class ReceiverSpec:
    initial: State
    terminal: frozenset[State]
    on_error: str
    state_docs: Mapping[State, str]
    events: Mapping[str, str]
    transitions: tuple[TransitionSpec, ...]
    polls: Mapping[State, Mapping[KVPoll, PollOutcome]]
    unknown_poll: PollOutcome
    unknown_polls: Mapping[State, PollOutcome]
    link_error_poll: PollOutcome
    link_error_polls: Mapping[State, PollOutcome]
    causes: Mapping[str, type[errors.ReceiverError]]
    actions: Mapping[str, str]
    guards: Mapping[str, str]
    timeouts: Mapping[State, TimeoutSpec]
    raw: Mapping[str, Any]

    def transitions_from(self, state: State) -> tuple[TransitionSpec, ...]:
        return tuple(t for t in self.transitions if state in t.sources)

    def unknown_poll_in(self, state: State) -> PollOutcome:
        """What a value outside KVPoll does in ``state``: the state's own rule, else the global one."""
        return self.unknown_polls.get(state, self.unknown_poll)

    def link_error_in(self, state: State) -> PollOutcome:
        """What a link that raised on some rank does in ``state``: the state's own rule, else the global one."""
        return self.link_error_polls.get(state, self.link_error_poll)


def default_spec_text() -> str:
    return resources.files("epd_receiver.spec").joinpath("receiver.toml").read_text(encoding="utf-8")


def load_spec(source: str | Path | None = None, overlay: Mapping[str, Any] | None = None) -> ReceiverSpec:
    """Parse the spec (the packaged one by default), optionally with an overlay merged over it.

    An overlay is how a variant states its one deviation: its tables replace or extend the file's,
    key by key; a ``transitions`` list in the overlay replaces the transitions that share its triggers,
    sources and conditions.
    """
    if source is None and not overlay:
        return _packaged_spec()
    if source is None:
        text = default_spec_text()
    elif isinstance(source, Path):
        text = source.read_text(encoding="utf-8")
    else:
        text = source
    raw = tomllib.loads(text)
    if overlay:
        raw = _merge(raw, overlay)
    return _parse(raw)


@functools.cache
def _packaged_spec() -> ReceiverSpec:
    """Parsed once per process: every queue of the product reads the same file, and the result is frozen."""
    return _parse(tomllib.loads(default_spec_text()))


def _merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if key == "transitions":
            replaced = {_transition_key(t) for t in value}
            kept = [t for t in merged.get(key, []) if _transition_key(t) not in replaced]
            merged[key] = kept + [dict(t) for t in value if not t.get("remove", False)]
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _transition_key(t: Mapping[str, Any]) -> tuple[Any, ...]:
    """An overlay's transition replaces the one with the same trigger, sources and conditions."""
    return (t["trigger"], _source_key(t["source"]), tuple(t.get("conditions", ())))


def _source_key(source: str | list[str]) -> tuple[str, ...]:
    return (source,) if isinstance(source, str) else tuple(source)


def _state(name: str, where: str) -> State:
    try:
        return State[name]
    except KeyError:
        raise SpecError(f"{where}: unknown state {name!r}") from None


def _parse(raw: Mapping[str, Any]) -> ReceiverSpec:
    declared = set(raw.get("states", {}))
    named = {s.name for s in State}
    if declared != named:
        raise SpecError(f"states in spec {sorted(declared)} differ from fsm.states.State {sorted(named)}")
    machine = raw["machine"]
    events: dict[str, str] = {name: body.get("doc", "") for name, body in raw.get("events", {}).items()}
    actions: dict[str, str] = {name: body.get("doc", "") for name, body in raw.get("actions", {}).items()}
    guards: dict[str, str] = {name: body.get("doc", "") for name, body in raw.get("guards", {}).items()}
    transitions = tuple(_transition(t, events, actions, guards) for t in raw.get("transitions", []))
    terminal = frozenset(_state(s, "machine.terminal") for s in machine["terminal"])
    causes = _causes(raw.get("causes", {}))
    on_error = machine["on_error"]
    if on_error not in events:
        raise SpecError(f"machine.on_error names unknown event {on_error!r}")
    polls_raw = dict(raw.get("polls", {}))
    unknown = _outcome(polls_raw.pop("unknown", NOOP), "polls.unknown", causes, on_error)
    link_error = _outcome(polls_raw.pop(LINK_ERROR_KEY, NOOP), f"polls.{LINK_ERROR_KEY}", causes, on_error)
    polls = {
        _state(name, "polls"): {
            _kvpoll(value, f"polls.{name}"): _outcome(outcome, f"polls.{name}.{value}", causes, on_error)
            for value, outcome in table.items()
            if value not in SPECIAL_COLUMNS
        }
        for name, table in polls_raw.items()
    }
    unknown_polls, link_error_polls = (
        {
            _state(name, "polls"): _outcome(table[key], f"polls.{name}.{key}", causes, on_error)
            for name, table in polls_raw.items()
            if key in table
        }
        for key in SPECIAL_COLUMNS
    )
    spec = ReceiverSpec(
        initial=_state(machine["initial"], "machine.initial"),
        terminal=terminal,
        on_error=on_error,
        state_docs={State[name]: body.get("doc", "") for name, body in raw["states"].items()},
        events=events,
        transitions=transitions,
        polls=polls,
        unknown_poll=unknown,
        unknown_polls=unknown_polls,
        link_error_poll=link_error,
        link_error_polls=link_error_polls,
        causes=causes,
        actions=actions,
        guards=guards,
        timeouts={
            _state(name, "timeouts"): _timeout(body, name, on_error) for name, body in raw.get("timeouts", {}).items()
        },
        raw=raw,
    )
    _check_polls(spec)
    return spec


def _transition(
    body: Mapping[str, Any], events: Mapping[str, str], actions: Mapping[str, str], guards: Mapping[str, str]
) -> TransitionSpec:
    trigger = body["trigger"]
    where = f"transition {trigger!r}"
    if trigger not in events:
        raise SpecError(f"{where}: event not declared under [events]")
    unknown_actions = [a for a in body.get("actions", []) if a not in actions]
    unknown_guards = [g for g in [*body.get("conditions", []), *body.get("unless", [])] if g not in guards]
    reads = frozenset(body.get("reads", []))
    if isinstance(body.get("reads", []), str):
        raise SpecError(f'{where}: reads is a list, e.g. ["aux", "data"]')
    if unknown_actions or unknown_guards or not reads <= READ_KINDS:
        bad_reads = sorted(reads - READ_KINDS)
        raise SpecError(f"{where}: undeclared actions {unknown_actions}, guards {unknown_guards}, reads {bad_reads}")
    return TransitionSpec(
        trigger=trigger,
        sources=tuple(_state(s, where) for s in _source_key(body["source"])),
        dest=_state(body["dest"], where),
        internal=bool(body.get("internal", False)),
        reads=reads,
        actions=tuple(body.get("actions", [])),
        conditions=tuple(body.get("conditions", [])),
        unless=tuple(body.get("unless", [])),
    )


def _timeout(body: str | Mapping[str, str], state: str, on_error: str) -> TimeoutSpec:
    """A plain field name fails the request with the cause `timeout`; a table names another event."""
    if isinstance(body, str):
        return TimeoutSpec(field=body, event=on_error, cause="timeout")
    if set(body) != {"field", "event"}:
        raise SpecError(f'timeouts.{state}: a field name, or {{ field = "...", event = "..." }}')
    return TimeoutSpec(field=body["field"], event=body["event"])


def _causes(table: Mapping[str, str]) -> dict[str, type[errors.ReceiverError]]:
    causes: dict[str, type[errors.ReceiverError]] = {}
    for cause, class_name in table.items():
        cls = getattr(errors, class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.ReceiverError)):
            raise SpecError(f"causes.{cause}: {class_name!r} is not a ReceiverError in fsm.errors")
        causes[cause] = cls
    return causes


def _kvpoll(name: str, where: str) -> KVPoll:
    try:
        return KVPoll[name]
    except KeyError:
        raise SpecError(f"{where}: {name!r} is not a KVPoll value ({[v.name for v in KVPoll]})") from None


def _outcome(text: str, where: str, causes: Mapping[str, type[errors.ReceiverError]], on_error: str) -> PollOutcome:
    if text == NOOP:
        return PollOutcome()
    if text.startswith(FAIL_PREFIX):
        cause = text.removeprefix(FAIL_PREFIX)
        if cause not in causes:
            raise SpecError(f"{where}: cause {cause!r} not declared under [causes]")
        return PollOutcome(event=on_error, cause=cause)
    if text == on_error:
        raise SpecError(f"{where}: {on_error!r} needs a cause: write '{FAIL_PREFIX}CAUSE'")
    event, _, guard = text.partition(" if ")
    return PollOutcome(event=event.strip(), guard=guard.strip() or None)


def _check_polls(spec: ReceiverSpec) -> None:
    """Every polled state answers every KVPoll value with an event the state can take.

    A terminal state is polled only to learn that the sender stopped writing into blocks the request
    still fences, so its poll table and its deadline may fire internal transitions only: nothing can
    leave a terminal state.
    """
    for state in State:
        table = spec.polls.get(state)
        if table is None and state in spec.terminal:
            continue
        if table is None or set(table) != set(KVPoll):
            raise SpecError(f"polls.{state.name}: must map every KVPoll value")
        for value, outcome in table.items():
            _check_fires(spec, state, outcome.event, f"polls.{state.name}.{value.name}")
            if outcome.guard is not None and outcome.guard not in spec.guards:
                raise SpecError(f"polls.{state.name}.{value.name}: guard {outcome.guard!r} not declared under [guards]")
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
    if state in spec.terminal and not all(t.internal for t in takes):
        raise SpecError(f"{where}: {event!r} would leave the terminal state {state.name}")
