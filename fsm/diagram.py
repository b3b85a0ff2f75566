"""Views of the spec for reviewers: the Mermaid diagram drawn by transitions and a markdown table.

Both are generated, committed in spec/RECEIVER.md between markers, and a test fails when they drift.
"""

from __future__ import annotations

from collections.abc import Mapping

from transitions.extensions import GraphMachine

from .kvpoll import KVPoll
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
    )
    text = str(machine.get_graph().draw(None))
    # Keep the diagram proper: drop the front matter (a bare title line, not valid Mermaid YAML) and the
    # styling of the drawing model's current state, which a spec does not have.
    body = text[text.index("stateDiagram-v2") :]
    lines = [line.rstrip() for line in body.splitlines() if not line.strip().startswith(("classDef", "Class "))]
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


def states_markdown(spec: ReceiverSpec) -> str:
    rows = ["| state | meaning |", "|---|---|"]
    rows += [f"| {state.name} | {doc} |" for state, doc in spec.state_docs.items()]
    return "\n".join(rows)


def actions_markdown(spec: ReceiverSpec) -> str:
    rows = ["| action | what it does |", "|---|---|"]
    rows += [f"| `{name}` | {doc} |" for name, doc in spec.actions.items()]
    return "\n".join(rows)


def polls_markdown(spec: ReceiverSpec) -> str:
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


def timeouts_markdown(spec: ReceiverSpec) -> str:
    from .request import ReceiverConfig

    defaults = ReceiverConfig()
    rows = ["| state | deadline (ReceiverConfig field) | default | when it passes |", "|---|---|---|---|"]
    for state, timeout in spec.timeouts.items():
        value = getattr(defaults, timeout.field, None)
        then = f"fail: {timeout.cause}" if timeout.cause else f"`{timeout.event}`"
        rows.append(f"| {state.name} | `{timeout.field}` | {'none' if value is None else f'{value:g} s'} | {then} |")
    return "\n".join(rows)


def generated_sections(spec: ReceiverSpec) -> dict[str, str]:
    return {
        "timeouts": timeouts_markdown(spec),
        "states": states_markdown(spec),
        "transitions": transitions_markdown(spec),
        "polls": polls_markdown(spec),
        "actions": actions_markdown(spec),
        "diagram": f"```mermaid\n{mermaid(spec)}\n```",
    }


def sync_generated(document: str, spec: ReceiverSpec, extra: Mapping[str, str] | None = None) -> str:
    """Replace every ``<!-- generated:NAME -->`` ... ``<!-- /generated:NAME -->`` block with its fresh text.

    ``extra`` adds sections generated elsewhere (the bug-variant table comes from the adapters).
    """
    for name, text in {**generated_sections(spec), **(extra or {})}.items():
        opening, closing = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
        start, end = document.find(opening), document.find(closing)
        if start < 0 or end < start:
            raise ValueError(f"the document has no {opening} ... {closing} block")
        document = document[: start + len(opening)] + "\n" + text + "\n" + document[end:]
    return document
