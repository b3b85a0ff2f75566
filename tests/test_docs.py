"""The reviewed documents stay true: generated sections match the spec, and the README's commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from epd_receiver.fsm import load_spec
from epd_receiver.fsm.diagram import generated_sections, mermaid, sync_generated

ROOT = Path(__file__).parent.parent
RECEIVER_MD = ROOT / "spec" / "RECEIVER.md"


def test_receiver_md_generated_sections_match_the_spec() -> None:
    document = RECEIVER_MD.read_text(encoding="utf-8")
    assert sync_generated(document, load_spec()) == document, "run `epd-receiver spec sync`"


def test_diagram_in_receiver_md_is_the_machine_drawn_by_transitions() -> None:
    diagram = mermaid(load_spec())
    assert diagram.startswith("stateDiagram-v2")
    assert f"```mermaid\n{diagram}\n```" in RECEIVER_MD.read_text(encoding="utf-8")
    edges = {line.strip().split(": ", 1)[0]: line for line in diagram.splitlines() if "-->" in line}
    for t in load_spec().transitions:
        for source in t.sources:
            dest = source if t.internal else t.dest
            edge = f"{source.name} --> {dest.name}"
            assert edge in edges and t.trigger in edges[edge], f"{edge}: {t.trigger} is not drawn"


def test_a_changed_spec_makes_the_document_stale() -> None:
    document = RECEIVER_MD.read_text(encoding="utf-8")
    edited = load_spec(overlay={"states": {"FAILED": {"doc": "Something else."}}})
    assert sync_generated(document, edited) != document
    assert "Something else." in generated_sections(edited)["states"]


def test_receiver_md_names_every_invariant() -> None:
    document = RECEIVER_MD.read_text(encoding="utf-8")
    for number in range(1, 12):
        assert re.search(rf"^\| I{number} \|", document, re.MULTILINE), f"I{number} missing from the table"


def test_every_test_named_in_receiver_md_exists() -> None:
    document = RECEIVER_MD.read_text(encoding="utf-8")
    for module, name in re.findall(r"`(test_\w+)\.py::(\w+)`", document):
        source = (ROOT / "tests" / f"{module}.py").read_text(encoding="utf-8")
        assert f"def {name}(" in source, f"{module}.py::{name} is named in RECEIVER.md but does not exist"


def test_readme_names_the_setup_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make simulate" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_embedding_example_runs_to_a_verified_payload() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (example,) = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    namespace: dict[str, object] = {}
    exec(compile(example, "README.md", "exec"), namespace)

    sender, payload = namespace["sender"], namespace["payload"]
    assert sender.source(1).mismatches(payload) == []  # type: ignore[attr-defined]
    assert namespace["allocator"].free_count == 256  # type: ignore[attr-defined]
