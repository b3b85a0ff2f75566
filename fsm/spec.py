"""Load and check spec/receiver.toml, the single source of the controller's behaviour.

The loader turns the file into plain frozen data and refuses anything inconsistent, so that a mistake in
the spec fails at import time with the line of thought spelled out, not later as a strange transition.
What the checks are lives in ``speccheck``; this module reads the file and builds the data.
"""

from __future__ import annotations

import copy
import functools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
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
# The events the queue's allocation pass fires, and the one the caller's release fires: the spec says
# from which states, and the queue derives whom it serves and whom it holds from that.
BLOCKS_GRANTED, WARMUP_ADMITTED = "blocks_granted", "warmup_admitted"
ALLOCATION_EVENTS = (BLOCKS_GRANTED, WARMUP_ADMITTED)
RELEASE_EVENT = "release"


@dataclass(frozen=True, slots=True)
class Guards:
    """One transition's guards: it is taken when every ``conditions`` guard holds and no ``unless`` one does."""

    conditions: tuple[str, ...] = ()
    unless: tuple[str, ...] = ()

    @property
    def terms(self) -> list[str]:
        """As a reader says them: each condition, then ``not`` each unless."""
        return [*self.conditions, *(f"not {name}" for name in self.unless)]


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

    @property
    def guards(self) -> Guards:
        return Guards(self.conditions, self.unless)

    def __str__(self) -> str:
        """How an error names it: trigger, sources, destination and guards, as the file writes them."""
        sources = "/".join(s.name for s in self.sources)
        guards = self.guards.terms
        return f"{self.trigger} {sources} -> {self.dest.name}" + (f" [{', '.join(guards)}]" if guards else "")


@dataclass(frozen=True, slots=True)
class PollOutcome:
    """What one reduced poll value does in one state: nothing, an event, or a failure with a cause.

    ``enabled_if`` is derived from the transitions, never written in the poll table: when every transition
    the event has from this state is guarded and all of them can be refused, it lists their guards, so
    that the request can see a quiet poll without calling the Machine's trigger (the fast path). Empty
    when some transition always takes the event.
    """

    event: str | None = None
    cause: str | None = None
    enabled_if: tuple[Guards, ...] = ()

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
    # The states in the order [states] declares them: the order a request moves through them.
    states: tuple[State, ...] = ()
    # Whom the allocation pass serves first ([machine] allocation_order), and the terminal states that
    # keep their blocks until the caller releases them (those with a `release` transition).
    allocation_order: tuple[State, ...] = ()
    held_until_release: frozenset[State] = frozenset()

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


def load_spec(
    source: str | Path | None = None,
    overlay: Mapping[str, Any] | None = None,
    *,
    states: type[State] = State,
) -> ReceiverSpec:
    """Parse the spec (the packaged one by default), optionally with an overlay merged over it.

    An overlay is how a variant states its one deviation: its tables replace or extend the file's,
    key by key; a ``transitions`` entry in the overlay replaces the transition with the same trigger,
    sources and guards (or removes it, with ``remove = true``), and is otherwise added. Transitions of
    one trigger and source must exclude each other, so where an added one lands in the list is moot.
    ``states`` is the code's State enum the spec must declare exactly (``fsm.states.State``).
    """
    if source is None and not overlay and states is State:
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
    return _parse(raw, states)


@functools.cache
def _packaged_spec() -> ReceiverSpec:
    """Parsed once per process: every queue of the product reads the same file, and the result is frozen."""
    return _parse(tomllib.loads(default_spec_text()), State)


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
    """A transition is known by its trigger, sources and guards: an overlay's one with the same key replaces it."""
    guards = (tuple(t.get("conditions", ())), tuple(t.get("unless", ())))
    return (t["trigger"], _source_key(t["source"]), guards)


def _source_key(source: str | list[str]) -> tuple[str, ...]:
    return (source,) if isinstance(source, str) else tuple(source)


def _state(states: type[State], name: str, where: str) -> State:
    try:
        return states[name]
    except KeyError:
        raise SpecError(f"{where}: unknown state {name!r}") from None


def _parse(raw: Mapping[str, Any], states: type[State]) -> ReceiverSpec:
    from .speccheck import check_spec

    declared = list(raw.get("states", {}))
    if set(declared) != set(states.__members__):
        raise SpecError(
            f"states in spec {sorted(declared)} differ from the code's State enum {sorted(states.__members__)}"
        )
    machine = raw["machine"]
    events: dict[str, str] = {name: body.get("doc", "") for name, body in raw.get("events", {}).items()}
    actions: dict[str, str] = {name: body.get("doc", "") for name, body in raw.get("actions", {}).items()}
    guards: dict[str, str] = {name: body.get("doc", "") for name, body in raw.get("guards", {}).items()}
    transitions = tuple(_transition(t, events, actions, guards, states) for t in raw.get("transitions", []))
    terminal = frozenset(_state(states, s, "machine.terminal") for s in machine["terminal"])
    causes = _causes(raw.get("causes", {}))
    on_error = machine["on_error"]
    if on_error not in events:
        raise SpecError(f"machine.on_error names unknown event {on_error!r}")
    polls_raw = dict(raw.get("polls", {}))
    unknown = _outcome(polls_raw.pop("unknown", NOOP), "polls.unknown", causes, on_error)
    link_error = _outcome(polls_raw.pop(LINK_ERROR_KEY, NOOP), f"polls.{LINK_ERROR_KEY}", causes, on_error)
    polls = {
        _state(states, name, "polls"): {
            _kvpoll(value, f"polls.{name}"): _outcome(outcome, f"polls.{name}.{value}", causes, on_error)
            for value, outcome in table.items()
            if value not in SPECIAL_COLUMNS
        }
        for name, table in polls_raw.items()
    }
    unknown_polls, link_error_polls = (
        {
            _state(states, name, "polls"): _outcome(table[key], f"polls.{name}.{key}", causes, on_error)
            for name, table in polls_raw.items()
            if key in table
        }
        for key in SPECIAL_COLUMNS
    )
    spec = ReceiverSpec(
        initial=_state(states, machine["initial"], "machine.initial"),
        terminal=terminal,
        on_error=on_error,
        state_docs={states[name]: body.get("doc", "") for name, body in raw["states"].items()},
        events=events,
        transitions=transitions,
        polls={state: _guarded(transitions, state, table) for state, table in polls.items()},
        unknown_poll=unknown,
        unknown_polls=_guarded(transitions, None, unknown_polls),
        link_error_poll=link_error,
        link_error_polls=_guarded(transitions, None, link_error_polls),
        causes=causes,
        actions=actions,
        guards=guards,
        timeouts={
            _state(states, name, "timeouts"): _timeout(body, name, on_error)
            for name, body in raw.get("timeouts", {}).items()
        },
        raw=raw,
        states=tuple(states[name] for name in declared),
        allocation_order=tuple(
            _state(states, name, "machine.allocation_order") for name in machine.get("allocation_order", [])
        ),
        held_until_release=frozenset(
            s for t in transitions if t.trigger == RELEASE_EVENT for s in t.sources if s in terminal
        ),
    )
    check_spec(spec)
    return spec


def _transition(
    body: Mapping[str, Any],
    events: Mapping[str, str],
    actions: Mapping[str, str],
    guards: Mapping[str, str],
    states: type[State],
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
        sources=tuple(_state(states, s, where) for s in _source_key(body["source"])),
        dest=_state(states, body["dest"], where),
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
    if len(text.split()) != 1:
        raise SpecError(
            f"{where}: {text!r}: a cell names noop, one event or {FAIL_PREFIX}CAUSE; a guard belongs on the "
            "event's [[transitions]], in `conditions` or `unless`"
        )
    return PollOutcome(event=text)


def _guarded(
    transitions: tuple[TransitionSpec, ...], state: State | None, table: Mapping[Any, PollOutcome]
) -> dict[Any, PollOutcome]:
    """Each outcome with the guards under which its event is taken from ``state`` (the table's key if None)."""
    return {key: _with_guards(transitions, key if state is None else state, o) for key, o in table.items()}


def _with_guards(transitions: tuple[TransitionSpec, ...], state: State, outcome: PollOutcome) -> PollOutcome:
    takes = [t for t in transitions if t.trigger == outcome.event and state in t.sources]
    alternatives = tuple(t.guards for t in takes)
    if not takes or always_enabled(alternatives):
        return outcome
    return replace(outcome, enabled_if=alternatives)


def always_enabled(alternatives: tuple[Guards, ...], most: int = 10) -> bool:
    """Whether, whatever the guards answer, one of the alternatives holds (every assignment is tried;
    with more than ``most`` guards the answer is a cautious False)."""
    names = sorted({g for a in alternatives for g in (*a.conditions, *a.unless)})
    if len(names) > most:
        return False
    for bits in range(1 << len(names)):
        holds = {name for i, name in enumerate(names) if bits >> i & 1}
        if not any(holds.issuperset(a.conditions) and holds.isdisjoint(a.unless) for a in alternatives):
            return False
    return True
