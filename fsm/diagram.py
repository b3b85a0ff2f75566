"""Views of the spec for reviewers: the Mermaid diagram drawn by transitions, and markdown tables.

All are generated, committed in spec/RECEIVER.md (and spec/VERIFICATION.md) between markers, and a test
fails when they drift. Every table shows every guard the spec names, and every cell escapes ``|``, which
would otherwise end the cell on a code host (state docs write ``|A0|``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from transitions.extensions import GraphMachine

from .kvpoll import KVPoll
from .machine import transition_table
from .spec import Guards, PollOutcome, ReceiverSpec, TransitionSpec
from .states import State

# The documents whose generated sections ``sync_documents`` keeps fresh, each section in exactly one.
SYNCED_DOCUMENTS = ("RECEIVER.md", "VERIFICATION.md")
NONE = "-"
FAST_PATH = "·"
_UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


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


def cell(text: str) -> str:
    """Text fit for one table cell: every unescaped ``|`` escaped, and on one line."""
    return _UNESCAPED_PIPE.sub(r"\\|", " ".join(text.split()))


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cell(c) for c in cells) + " |"


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    names = list(header)
    return "\n".join([_row(names), "|" + "---|" * len(names), *(_row(r) for r in rows)])


def guard_text(guards: Guards) -> str:
    """One transition's guards as a reader says them: ``a and not b``; ``-`` for none."""
    return " and ".join(guards.terms) or NONE


def _poll_cell(outcome: PollOutcome) -> str:
    if outcome.is_noop:
        return FAST_PATH
    if outcome.cause:
        return f"fail: {outcome.cause}"
    text = f"`{outcome.event}`"
    if outcome.enabled_if:
        alternatives = " or ".join(guard_text(g) for g in outcome.enabled_if)
        text += f" if {alternatives}, else {FAST_PATH}"
    return text


def _by_source(spec: ReceiverSpec) -> list[tuple[State, TransitionSpec]]:
    """Every (source, transition) pair, grouped by source in the spec's state order, then in file order."""
    order = {state: i for i, state in enumerate(spec.states)}
    pairs = [(source, t) for t in spec.transitions for source in t.sources]
    return sorted(pairs, key=lambda pair: order[pair[0]])


def transitions_markdown(spec: ReceiverSpec) -> str:
    rows = []
    for source, t in _by_source(spec):
        dest = "(stays)" if t.internal else t.dest.name
        reads = ", ".join(sorted(t.reads)) or NONE
        actions = ", ".join(f"`{a}`" for a in t.actions) or NONE
        rows.append([source.name, f"`{t.trigger}`", guard_text(t.guards), dest, reads, actions])
    return _table(["from", "event", "guard", "to", "reads", "actions"], rows)


def states_markdown(spec: ReceiverSpec) -> str:
    return _table(["state", "meaning"], [[state.name, doc] for state, doc in spec.state_docs.items()])


def events_markdown(spec: ReceiverSpec) -> str:
    return _table(["event", "meaning"], [[f"`{name}`", doc] for name, doc in spec.events.items()])


def guards_markdown(spec: ReceiverSpec) -> str:
    """Each guard, what it answers, and the transitions that ask it (``not``: under ``unless``)."""
    rows = []
    for name, doc in spec.guards.items():
        users = []
        for t in spec.transitions:
            if name in t.conditions or name in t.unless:
                negation = "not " if name in t.unless else ""
                sources = "/".join(s.name for s in t.sources)
                users.append(f"`{t.trigger}` from {sources} ({negation}{name})")
        rows.append([f"`{name}`", doc, "; ".join(users) or NONE])
    return _table(["guard", "holds when", "asked by"], rows)


def actions_markdown(spec: ReceiverSpec) -> str:
    return _table(["action", "what it does"], [[f"`{name}`", doc] for name, doc in spec.actions.items()])


def polls_markdown(spec: ReceiverSpec) -> str:
    header = ["state", *(v.name for v in KVPoll), "other value", "link error"]
    rows = []
    for state, table in spec.polls.items():
        outcomes = [*(table[value] for value in KVPoll), spec.unknown_poll_in(state), spec.link_error_in(state)]
        rows.append([state.name, *(_poll_cell(o) for o in outcomes)])
    return _table(header, rows)


def timeouts_markdown(spec: ReceiverSpec) -> str:
    from .config import ReceiverConfig

    defaults = ReceiverConfig()
    rows = []
    for state, timeout in spec.timeouts.items():
        value = getattr(defaults, timeout.field, None)
        then = f"fail: {timeout.cause}" if timeout.cause else f"`{timeout.event}`"
        rows.append([state.name, f"`{timeout.field}`", "none" if value is None else f"{value:g} s", then])
    return _table(["state", "deadline (ReceiverConfig field)", "default", "when it passes"], rows)


def generated_sections(spec: ReceiverSpec) -> dict[str, str]:
    return {
        "timeouts": timeouts_markdown(spec),
        "states": states_markdown(spec),
        "events": events_markdown(spec),
        "guards": guards_markdown(spec),
        "transitions": transitions_markdown(spec),
        "polls": polls_markdown(spec),
        "actions": actions_markdown(spec),
        "diagram": f"```mermaid\n{mermaid(spec)}\n```",
    }


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"


def _replace(document: str, name: str, text: str) -> str:
    opening, closing = _markers(name)
    start, end = document.find(opening), document.find(closing)
    if start < 0 or end < start:
        raise ValueError(f"the document has no {opening} ... {closing} block")
    return document[: start + len(opening)] + "\n" + text + "\n" + document[end:]


def sync_generated(document: str, spec: ReceiverSpec, extra: Mapping[str, str] | None = None) -> str:
    """Replace every ``<!-- generated:NAME -->`` ... ``<!-- /generated:NAME -->`` block with its fresh text.

    ``extra`` adds sections generated elsewhere (the bug-variant table comes from the adapters).
    """
    for name, text in {**generated_sections(spec), **(extra or {})}.items():
        document = _replace(document, name, text)
    return document


def sync_documents(
    documents: Mapping[str, str], spec: ReceiverSpec, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Each generated section refreshed in the one document (by name) that holds its opening marker.

    A section that no document holds, or that two do, is a ValueError naming it: it would otherwise be
    left stale, or kept in two places that could disagree.
    """
    synced = dict(documents)
    for name, text in {**generated_sections(spec), **(extra or {})}.items():
        opening = _markers(name)[0]
        holders = [key for key, body in synced.items() if opening in body]
        if len(holders) != 1:
            where = ", ".join(holders) or "none"
            raise ValueError(f"{opening} must be in exactly one of {', '.join(synced)}; it is in {where}")
        synced[holders[0]] = _replace(synced[holders[0]], name, text)
    return synced
