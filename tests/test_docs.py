"""The reviewed documents stay true: generated sections match the spec, every table renders, every name
they give exists, and the README's commands and layout are those of the checkout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from epd_receiver.adapters.kit.variant_records import variants_markdown
from epd_receiver.fsm import load_spec
from epd_receiver.fsm.diagram import (
    SYNCED_DOCUMENTS,
    generated_sections,
    guard_text,
    mermaid,
    polls_markdown,
    sync_documents,
    sync_generated,
    transitions_markdown,
)
from epd_receiver.fsm.spec import ReceiverSpec

ROOT = Path(__file__).parent.parent
SPEC = ROOT / "spec"
RECEIVER_MD = SPEC / "RECEIVER.md"
VERIFICATION_MD = SPEC / "VERIFICATION.md"
README = ROOT / "README.md"
DOCUMENTS = (README, RECEIVER_MD, VERIFICATION_MD)
BUGS = SPEC / "scenarios" / "bugs"


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def synced_documents() -> dict[str, str]:
    return {name: read(SPEC / name) for name in SYNCED_DOCUMENTS if (SPEC / name).is_file()}


# ---- Markdown tables, as a code host parses them (GitHub Flavored Markdown) --------------------------

FENCE = re.compile(r"^\s*(```|~~~)")
DELIMITER = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")


def cells(row: str) -> list[str]:
    """A table row's cells. Every ``|`` not escaped by a backslash ends a cell, inside a code span too (in
    a table, GFM splits the row before it parses code spans); the outer pipes open and close the row."""
    parts, current, i, text = [], "", 0, row.strip()
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            current += text[i : i + 2]
            i += 2
            continue
        if text[i] == "|":
            parts.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    parts.append(current)
    if text.startswith("|"):
        parts = parts[1:]
    if parts and not parts[-1].strip() and text.endswith("|"):
        parts = parts[:-1]
    return [p.strip() for p in parts]


def tables(document: str) -> list[tuple[int, list[list[str]]]]:
    """Every table outside fenced code: (line number of its header, its rows of cells, header first and
    the delimiter row second)."""
    lines = document.splitlines()
    found, fenced, i = [], False, 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            fenced = not fenced
        elif not fenced and lines[i].lstrip().startswith("|") and i + 1 < len(lines) and DELIMITER.match(lines[i + 1]):
            start, rows = i, [cells(lines[i]), cells(lines[i + 1])]
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            found.append((start + 1, rows))
            continue
        i += 1
    return found


def broken_rows(document: str) -> list[str]:
    """Rows whose cell count differs from their header's: a code host drops or pads their cells."""
    problems = []
    for line, rows in tables(document):
        width = len(rows[0])
        for offset, row in enumerate(rows[1:], start=1):
            if len(row) != width:
                problems.append(f"line {line + offset}: {len(row)} cells, its header {width}: {row}")
    return problems


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_table_renders_with_as_many_cells_in_each_row_as_in_its_header(path: Path) -> None:
    document = read(path)
    assert tables(document), f"{path.name} has no table: the parser missed them"
    assert broken_rows(document) == [], f"{path.name}: escape `|` inside a cell as `\\|`"


def test_the_table_check_catches_an_unescaped_pipe_and_passes_an_escaped_one() -> None:
    header = "| state | meaning |\n|---|---|\n"
    assert broken_rows(header + "| TRANSFERRING | Init(A0, |A0|*B) sent. |\n")
    assert broken_rows(header + "| TRANSFERRING | Init(A0, `|A0|`·B) sent. |\n"), "a code span does not shield it"
    assert broken_rows(header + "| TRANSFERRING | Init(A0, \\|A0\\|*B) sent. |\n") == []
    assert broken_rows(header + "| TRANSFERRING | Init(A0, `\\|A0\\|`·B) sent. |\n") == []
    assert broken_rows("```\n" + header + "| a | b | c |\n```\n") == [], "fenced code holds no table"
    assert cells("| a | b \\| c | `d` |") == ["a", "b \\| c", "`d`"]


def test_every_generated_table_escapes_a_pipe_in_any_text_the_spec_gives() -> None:
    piped = "a |x| b"
    spec = load_spec(
        overlay={
            "states": {"FAILED": {"doc": piped}},
            "events": {"fail": {"doc": piped}},
            "guards": {"is_warmup": {"doc": piped}},
            "actions": {"record_error": {"doc": piped}},
        }
    )
    sections = generated_sections(spec)
    for name in ("states", "events", "guards", "actions"):
        assert "a \\|x\\| b" in sections[name], name
    for name, text in sections.items():
        assert broken_rows(text) == [], name


# ---- generated sections --------------------------------------------------------------------------------


def test_generated_sections_of_every_document_match_the_spec_and_the_recorded_variants() -> None:
    documents = synced_documents()
    variants = {"variants": variants_markdown(BUGS)}
    assert sync_documents(documents, load_spec(), variants) == documents, "run `epd-receiver spec sync`"


def test_receiver_md_generated_sections_match_the_spec() -> None:
    """What ``spec sync`` writes today: every section of the spec into RECEIVER.md."""
    document = read(RECEIVER_MD)
    assert sync_generated(document, load_spec()) == document, "run `epd-receiver spec sync`"


def test_a_section_in_no_document_or_in_two_is_refused() -> None:
    documents = synced_documents()
    with pytest.raises(ValueError, match=r"<!-- generated:more --> must be in exactly one of .*; it is in none"):
        sync_documents(documents, load_spec(), {"variants": "x", "more": "y"})
    block = "<!-- generated:states -->\n<!-- /generated:states -->"
    with pytest.raises(ValueError, match=r"generated:states -->.* it is in RECEIVER.md, VERIFICATION.md"):
        sync_documents({**documents, "VERIFICATION.md": read(VERIFICATION_MD) + block}, load_spec())


def test_diagram_in_receiver_md_is_the_machine_drawn_by_transitions() -> None:
    diagram = mermaid(load_spec())
    assert diagram.startswith("stateDiagram-v2")
    assert f"```mermaid\n{diagram}\n```" in read(RECEIVER_MD)
    edges = {line.strip().split(": ", 1)[0]: line for line in diagram.splitlines() if "-->" in line}
    for t in load_spec().transitions:
        for source in t.sources:
            dest = source if t.internal else t.dest
            edge = f"{source.name} --> {dest.name}"
            assert edge in edges and t.trigger in edges[edge], f"{edge}: {t.trigger} is not drawn"


def test_a_changed_spec_makes_the_document_stale() -> None:
    document = read(RECEIVER_MD)
    edited = load_spec(overlay={"states": {"FAILED": {"doc": "Something else."}}})
    assert sync_generated(document, edited) != document
    assert "Something else." in generated_sections(edited)["states"]


def table_rows(markdown: str) -> list[dict[str, str]]:
    (_, rows), *_ = tables(markdown)
    return [dict(zip(rows[0], row, strict=True)) for row in rows[2:]]


def test_the_transitions_table_shows_every_transition_with_its_guard_and_reads() -> None:
    spec = load_spec()
    rows = table_rows(transitions_markdown(spec))
    keys = [(r["from"], r["event"], r["guard"]) for r in rows]
    assert len(keys) == len(set(keys)), "two rows that nothing tells apart"
    for t in spec.transitions:
        reads = ", ".join(sorted(t.reads)) or "-"
        for source in t.sources:
            row = (source.name, f"`{t.trigger}`", guard_text(t.guards))
            assert row in keys, f"{t} from {source.name} is missing or its guard is not shown"
            assert rows[keys.index(row)]["reads"] == reads
    warmup = [r["guard"] for r in rows if (r["from"], r["event"]) == ("TRANSFERRING", "`payload_landed`")]
    assert sorted(warmup) == ["is_warmup", "not is_warmup"]
    fences = [r["guard"] for r in rows if (r["from"], r["event"]) == ("RESUMING", "`fail`")]
    assert sorted(fences) == ["not sender_may_write", "sender_may_write"]


def _poll_rows(spec: ReceiverSpec) -> dict[str, dict[str, str]]:
    return {r["state"]: r for r in table_rows(polls_markdown(spec))}


def test_the_poll_table_shows_when_a_cell_is_refused_by_its_transitions_guards() -> None:
    rows = _poll_rows(load_spec())
    assert rows["RESUMING"]["Transferring"] == "`round_landed` if sender_progressed, else ·"
    assert rows["TRANSFERRING"]["Success"] == "`payload_landed`", "taken whatever is_warmup answers"
    assert rows["FAILED"]["Failed"] == "`sender_stopped` if holds_fence and senders_stopped, else ·"
    assert rows["RESUMING"]["other value"] == "fail: unknown_status"
    assert rows["RESUMING"]["link error"] == "fail: transport_failed"


# ---- what the documents name ---------------------------------------------------------------------------


def test_every_invariant_is_stated_in_receiver_md_and_its_checks_named_in_verification_md() -> None:
    for path in (RECEIVER_MD, VERIFICATION_MD):
        document = read(path)
        for number in range(1, 15):
            assert re.search(rf"^\| I{number} \|", document, re.MULTILINE), f"I{number} missing from {path.name}"


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_test_and_scenario_a_document_names_exists(path: Path) -> None:
    document = read(path)
    tests = {p.stem: p for p in (ROOT / "tests").rglob("test_*.py")}  # named by file, wherever its layer puts it
    for module, name in re.findall(r"`(test_\w+)\.py::(\w+)`", document):
        assert module in tests, f"{module}.py is named in {path.name} but does not exist"
        assert f"def {name}(" in read(tests[module]), f"{module}.py::{name} is named in {path.name} but does not exist"
    for module in set(re.findall(r"\b(test_\w+)\.py\b", document)):
        assert module in tests, f"{module}.py is named in {path.name} but does not exist"
    scenarios = {p.name for p in (SPEC / "scenarios").rglob("*.json")}
    for name in set(re.findall(r"`(?:bugs/)?([\w-]+\.json)`", document)):
        assert name in scenarios, f"scenario {name} is named in {path.name} but does not exist"


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_no_document_points_outside_the_project(path: Path) -> None:
    document = read(path)
    for outside in ("../", "shared/", "design.md", "sglang-epd-protocol", "MUTATION.md"):
        assert outside not in document, f"{path.name} names {outside!r}"


def test_the_documents_link_each_other() -> None:
    assert "(VERIFICATION.md)" in read(RECEIVER_MD)
    assert "(RECEIVER.md)" in read(VERIFICATION_MD)
    assert "spec/VERIFICATION.md" in read(README)


def test_readme_names_the_setup_commands_and_ci_runs_the_test_one() -> None:
    readme = read(README)
    assert "make simulate" in readme and "make test" in readme
    assert "make test" in read(ROOT / ".ci" / "run")


def test_mutation_testing_is_run_by_the_make_target_the_documents_name() -> None:
    for path in (README, VERIFICATION_MD):
        assert "make mutation" in read(path), path.name
    makefile = ROOT / "Makefile"
    if makefile.is_file():  # not in the staged copy that mutation testing itself runs in
        assert re.search(r"^mutation:", read(makefile), re.MULTILINE)
        assert "build/mutation/src/epd_receiver" in read(VERIFICATION_MD)


def layout() -> dict[str, str]:
    """The README's Layout table: path cell (backticks stripped) to what cell."""
    section = read(README).split("## Layout", 1)[1]
    return {row["path"].strip("`"): row["what"] for row in table_rows(section)}


@pytest.mark.skipif(not (ROOT / "fsm").is_dir(), reason="a staged copy without the checkout's layout")
def test_the_layout_table_names_paths_that_exist_and_every_adapters_folder() -> None:
    named = layout()
    for path, what in named.items():
        assert (ROOT / path).exists(), f"README Layout names {path}, which does not exist"
        if path.endswith("/"):
            for module in re.findall(r"`(\w+\.py)`", what):
                assert (ROOT / path / module).is_file(), f"README Layout names {path}{module}, which does not exist"
    folders = {
        p.parent.relative_to(ROOT).as_posix() + "/"
        for p in (ROOT / "adapters").rglob("*.py")
        if p.parent != ROOT / "adapters" and "__pycache__" not in p.parts
    }
    assert folders <= set(named), f"README Layout does not name {sorted(folders - set(named))}"


def test_readme_embedding_example_runs_to_a_verified_payload() -> None:
    readme = read(README)
    (example,) = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    namespace: dict[str, object] = {}
    exec(compile(example, "README.md", "exec"), namespace)

    sender, payload = namespace["sender"], namespace["payload"]
    assert sender.source(1).mismatches(payload) == []  # type: ignore[attr-defined]
    assert namespace["allocator"].free_count == 256  # type: ignore[attr-defined]
