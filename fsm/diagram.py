"""Views of the spec for reviewers: the Mermaid diagram drawn by transitions and a markdown table.

Both are generated, committed in spec/RECEIVER.md between markers, and a test fails when they drift.
"""

from __future__ import annotations

from transitions.extensions import GraphMachine

from .machine import transition_table
from .spec import ReceiverSpec
from .states import State


class _Drawing:
    """A bare model: the diagram needs states and edges, not behaviour."""


def mermaid(spec: ReceiverSpec) -> str:
    machine = GraphMachine(
        model=_Drawing(),
        states=State,
        transitions=transition_table(spec),
        initial=spec.initial,
        auto_transitions=False,
        graph_engine="mermaid",
        show_conditions=True,
        title="Receiver controller (generated from spec/receiver.toml)",
    )
    text = str(machine.get_graph().draw(None))
    # Drop the styling of the drawing model's current state: a spec has no current state.
    lines = [line.rstrip() for line in text.splitlines() if not line.strip().startswith(("classDef", "Class "))]
    return "\n".join(line for line in lines if line).strip()


def transitions_markdown(spec: ReceiverSpec) -> str:
    rows = ["| from | event | to | reads | actions |", "|---|---|---|---|---|"]
    for t in spec.transitions:
        dest = "(stays)" if t.internal else t.dest.name
        reads = ", ".join(sorted(t.reads)) or "-"
        actions = ", ".join(f"`{a}`" for a in t.actions) or "-"
        for source in t.sources:
            rows.append(f"| {source.name} | `{t.trigger}` | {dest} | {reads} | {actions} |")
    return "\n".join(rows)


def polls_markdown(spec: ReceiverSpec) -> str:
    from .kvpoll import KVPoll

    header = "| state | " + " | ".join(v.name for v in KVPoll) + " |"
    rows = [header, "|---|" + "---|" * len(KVPoll)]
    for state, table in spec.polls.items():
        cells = []
        for value in KVPoll:
            outcome = table[value]
            cells.append(
                "·" if outcome.is_noop else (f"fail: {outcome.cause}" if outcome.cause else f"`{outcome.event}`")
            )
        rows.append(f"| {state.name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
