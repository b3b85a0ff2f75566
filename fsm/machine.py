"""Build the one transitions Machine that drives every request, from the spec and nothing else."""

from __future__ import annotations

import logging
from typing import Any

from transitions import Machine

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


def build_machine(spec: ReceiverSpec, model_class: type) -> Machine:
    """The states are the spec's, in its order, so that a state added to the spec and the State enum
    needs nothing here."""
    check_implemented(spec, model_class)
    return Machine(
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
