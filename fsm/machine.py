"""Build the one transitions Machine that drives every request, from the spec and nothing else.

The Machine is transitions' own, with its models kept where a queue of many thousand requests can find
them without walking them all: by identity, and by state in arrival order (``SpecMachine``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from enum import Enum
from typing import Any

from transitions import Machine
from transitions.core import State as MachineState
from transitions.core import listify

from .errors import SpecError
from .spec import ReceiverSpec, TransitionSpec

WINDOW_OPENERS = {"aux": "open_aux_window", "data": "open_data_window"}
WINDOW_CLOSER = "close_read_window"
ENTRY_STAMP = "stamp_entry"

# transitions logs every trigger at INFO and every ignored one at WARNING; the controller is on a hot path.
logging.getLogger("transitions").setLevel(logging.ERROR)


def transition_table(spec: ReceiverSpec) -> list[dict[str, Any]]:
    """The spec's transitions in transitions' own vocabulary; read windows open before any action."""
    return [_entry(t) for t in spec.transitions]


def _entry(t: TransitionSpec) -> dict[str, Any]:
    openers = [WINDOW_OPENERS[kind] for kind in sorted(t.reads)]
    return {
        "trigger": t.trigger,
        "source": [s.name for s in t.sources],
        "dest": None if t.internal else t.dest.name,
        "conditions": list(t.conditions),
        "unless": list(t.unless),
        "before": openers + list(t.actions),
    }


def check_implemented(spec: ReceiverSpec, model_class: type) -> None:
    """Every action and guard the spec names must be a method of the model: no name without a body."""
    needed = set(spec.actions) | set(spec.guards) | set(WINDOW_OPENERS.values()) | {WINDOW_CLOSER, ENTRY_STAMP}
    missing = sorted(name for name in needed if not callable(getattr(model_class, name, None)))
    if missing:
        raise SpecError(f"{model_class.__name__} does not implement {missing}")


class Members:
    """The Machine's models in admission order, each with its arrival number. Membership, admission and
    removal go by identity in constant time, where transitions' plain list compares every model (admitting
    n requests would cost n² comparisons, and each removal a walk). Reads like that list otherwise."""

    __slots__ = ("_by_id", "_next")

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[int, Any]] = {}
        self._next = 0

    def append(self, model: Any) -> None:
        self._by_id[id(model)] = (self._next, model)
        self._next += 1

    def remove(self, model: Any) -> int:
        """Forget ``model``; its arrival number."""
        arrival = self.arrival(model)
        if arrival is None:
            raise ValueError(f"{model!r} is not a model of this machine")
        del self._by_id[id(model)]
        return arrival

    def arrival(self, model: Any) -> int | None:
        """The model's arrival number, None when it is not a member."""
        entry = self._by_id.get(id(model))
        return entry[0] if entry is not None and entry[1] is model else None

    def __contains__(self, model: object) -> bool:
        return self.arrival(model) is not None

    def __iter__(self) -> Iterator[Any]:
        return (model for _, model in self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def __getitem__(self, index: int) -> Any:
        return list(self)[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Members | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by content like the list it stands for

    def __repr__(self) -> str:
        return repr(list(self))

    def __getstate__(self) -> tuple[list[tuple[int, Any]], int]:
        """Copied or pickled by content: the identities it is keyed by are those of this process's models."""
        return list(self._by_id.values()), self._next

    def __setstate__(self, state: tuple[list[tuple[int, Any]], int]) -> None:
        entries, self._next = state
        self._by_id = {id(model): (arrival, model) for arrival, model in entries}


class SpecMachine(Machine):
    """transitions' Machine, with its models indexed as their states change.

    Nothing is bound onto a model: the request class carries ``trigger`` itself (it asks this Machine to
    fire the named event), so admitting a request costs one entry here instead of a partial function per
    event, per ``may_`` check and per ``is_`` helper on every instance. Every state change goes through
    ``set_state``, which keeps each state's models by arrival number, and notes the models that reached a
    terminal state until their queue collects them (``take_settled``): the queue's allocation pass and
    collection then look only at the requests that wait or that settled, never at all of them.
    """

    models: Members  # type: ignore[assignment]  # transitions declares a list; this one reads like it

    def __init__(self, *, terminal: frozenset[Enum] = frozenset(), **kwargs: Any) -> None:
        self._terminal = terminal
        self._in_state: dict[Any, dict[int, Any]] = {}
        self._settled: dict[int, Any] = {}
        super().__init__(**kwargs)
        self.models = Members()
        self._in_state = {state.value: {} for state in self.states.values()}

    def add_model(self, model: Any, initial: Any = None) -> None:
        """Admit models in their initial state; one already admitted is left as it is (as transitions does)."""
        start = self.initial if initial is None else initial
        if start is None:
            raise ValueError("No initial state configured for machine, must specify when adding model.")
        for mod in listify(model):
            if mod not in self.models:
                self.models.append(mod)
                self.set_state(start, model=mod)

    def remove_model(self, model: Any) -> None:
        models = listify(model)
        for mod in models:
            arrival = self.models.remove(mod)
            self._in_state[getattr(mod, self.model_attribute)].pop(arrival, None)
            self._settled.pop(arrival, None)
        if self._transition_queue:  # transitions' own rule: drop the removed models' queued events
            first, *rest = self._transition_queue
            self._transition_queue.clear()
            kept = [e for e in rest if getattr(e, "args")[0].model not in models]  # noqa: B009
            self._transition_queue.extend([first, *kept])

    def set_state(self, state: Any, model: Any = None) -> None:
        """Every state change of a model, its admission included, passes here: the index follows it."""
        if not isinstance(state, MachineState):
            state = self.get_state(state)
        value = state.value
        attribute = self.model_attribute
        for mod in self.models if model is None else listify(model):
            arrival = self.models.arrival(mod)
            if arrival is not None:
                left = getattr(mod, attribute, None)
                if left is not None:
                    self._in_state[left].pop(arrival, None)
                self._in_state[value][arrival] = mod
                if value in self._terminal:
                    self._settled[arrival] = mod
            setattr(mod, attribute, value)

    def trigger_event(self, model: Any, event: str, *args: Any, **kwargs: Any) -> bool:
        """What the ``trigger`` transitions binds onto each model does, for a model class that defines
        ``trigger`` itself."""
        return self._get_trigger(model, event, *args, **kwargs)

    def in_state(self, state: Enum) -> list[Any]:
        """The models in ``state`` now, in arrival order."""
        members = self._in_state[state]
        return [members[arrival] for arrival in sorted(members)]

    def settled(self) -> list[Any]:
        """The models that reached a terminal state since the last ``take_settled``, in arrival order, those
        still there; they stay noted."""
        return [m for a, m in sorted(self._settled.items()) if getattr(m, self.model_attribute) in self._terminal]

    @property
    def has_settled(self) -> bool:
        return bool(self._settled)

    def take_settled(self) -> list[Any]:
        """As ``settled``, and forget them."""
        found = self.settled()
        self._settled.clear()
        return found


def build_machine(spec: ReceiverSpec, model_class: type) -> SpecMachine:
    """The states are the spec's, in its order, so that a state added to the spec and the State enum
    needs nothing here."""
    check_implemented(spec, model_class)
    return SpecMachine(
        terminal=frozenset(spec.terminal),
        model=None,
        states=list(spec.states),
        transitions=transition_table(spec),
        initial=spec.initial,
        auto_transitions=False,
        send_event=True,
        finalize_event=WINDOW_CLOSER,
        after_state_change=ENTRY_STAMP,
        ignore_invalid_triggers=False,
    )
