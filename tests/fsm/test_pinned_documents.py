"""Behaviour of the documents drawn from the spec that the protocol tests pass through without pinning
down: the diagram and the deadline table (``fsm/diagram.py``), and how ``spec sync`` refreshes the
generated blocks of a document.

Each test states one observable behaviour that a plausible slip in the code would change and that the
tests above it do not distinguish (test_pinned_spec.py says more; spec/VERIFICATION.md §9 lists what
mutation testing of ``fsm/`` finds).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from support.spec_text import fresh_spec

from epd_receiver.fsm import load_spec
from epd_receiver.fsm.diagram import generated_sections, mermaid, sync_generated, timeouts_markdown

RECEIVER_MD = Path(__file__).parents[2] / "spec" / "RECEIVER.md"

# ---- the diagram and the tables -----------------------------------------------------------------------


def test_the_diagram_is_mermaid_even_where_graphviz_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """transitions prefers (py)graphviz when it can import it; the committed diagram is Mermaid regardless."""
    import transitions.extensions.diagrams_graphviz as graphviz_backend
    import transitions.extensions.diagrams_pygraphviz as pygraphviz_backend

    plain = mermaid(load_spec())

    class Unusable:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"a graphviz backend was used ({name})")

    monkeypatch.setattr(pygraphviz_backend, "pgv", Unusable())
    monkeypatch.setattr(graphviz_backend, "pgv", Unusable())
    assert mermaid(load_spec()) == plain


def test_a_deadline_on_a_field_the_config_lacks_is_documented_without_a_default() -> None:
    """The document can be drawn for a spec that deadlines() would refuse: the default shows as none."""
    spec = load_spec(overlay={"timeouts": {"RESUMING": "no_such_field_s"}})
    (row,) = [line for line in timeouts_markdown(spec).splitlines() if line.startswith("| RESUMING ")]
    assert row == "| RESUMING | `no_such_field_s` | none | fail: timeout |"


# ---- refreshing the generated blocks ------------------------------------------------------------------


def _block(name: str, text: str) -> str:
    return f"<!-- generated:{name} -->\n{text}\n<!-- /generated:{name} -->"


def _sections() -> dict[str, str]:
    """Every generated section as a stale block, by name."""
    return {name: _block(name, "stale") for name in generated_sections(load_spec())}


def test_sync_refreshes_a_block_at_the_very_start_of_the_document() -> None:
    blocks = _sections()
    document = "\n\n".join(blocks.values())
    assert document.startswith("<!-- generated:")
    synced = sync_generated(document, load_spec())
    assert "stale" not in synced
    assert sync_generated(synced, load_spec()) == synced


def test_sync_keeps_the_text_outside_the_blocks_even_when_a_block_repeats() -> None:
    blocks = _sections()
    first = blocks["states"]
    document = "\n\n".join(blocks.values()) + "\n\nProse between.\n\n" + first + "\n\nProse after.\n"
    synced = sync_generated(document, load_spec())
    assert "Prose between." in synced and "Prose after." in synced
    assert synced.index("| state | meaning |") < synced.index("Prose between.")


@pytest.mark.parametrize("broken", ["missing", "closed before opened"])
def test_sync_refuses_a_document_whose_block_is_missing_or_inside_out(broken: str) -> None:
    blocks = _sections()
    if broken == "missing":
        del blocks["polls"]
    else:
        blocks["polls"] = "<!-- /generated:polls -->\nstale\n<!-- generated:polls -->"
    expected = "the document has no <!-- generated:polls --> ... <!-- /generated:polls --> block"
    with pytest.raises(ValueError, match=re.escape(expected)):
        sync_generated("\n\n".join(blocks.values()), load_spec())


def test_a_fresh_parse_of_the_packaged_text_draws_the_committed_document() -> None:
    document = RECEIVER_MD.read_text(encoding="utf-8")
    assert sync_generated(document, fresh_spec()) == document
