"""The ``epd-receiver spec`` commands: the diagram, and ``spec sync`` and ``spec check`` with ``--spec-dir``.

They write into a checkout's spec directory (the one ``--spec-dir`` names, or the checkout they run in),
refreshing each generated section in the document that holds it, and never into an installed package.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support.command_line import run_cli

from epd_receiver.adapters.kit.quint import QuintMissing, quint_binary
from epd_receiver.adapters.kit.variant_records import variants_markdown
from epd_receiver.fsm import State

# ---- spec diagram -----------------------------------------------------------------------------------


def test_spec_diagram_prints_a_mermaid_state_diagram_of_every_state(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "spec", "diagram")

    assert code == 0
    assert "stateDiagram-v2" in out.splitlines()
    for state in State:
        assert state.name in out


# ---- commands that write files: into a checkout, never into an installed package ----------------------

SPEC = Path(__file__).parents[2] / "spec"
STALE = "<!-- generated:states -->\nstale\n<!-- /generated:states -->"


def copy_spec(destination: Path) -> Path:
    """The checkout's spec/ (without node_modules) at ``destination``, its state table made stale."""
    shutil.copytree(SPEC, destination, ignore=shutil.ignore_patterns("node_modules", "__pycache__"))
    document = destination / "RECEIVER.md"
    text = document.read_text(encoding="utf-8")
    start, end = text.index("<!-- generated:states -->"), text.index("<!-- /generated:states -->")
    document.write_text(text[:start] + STALE + text[end + len("<!-- /generated:states -->") :], encoding="utf-8")
    return destination


def test_spec_sync_writes_into_the_spec_directory_it_is_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = copy_spec(tmp_path / "checkout" / "spec")
    ours = (SPEC / "RECEIVER.md").read_bytes()

    assert run_cli(capsys, "spec", "sync", "--spec-dir", str(spec), "--check")[0] == 1
    code, out, _ = run_cli(capsys, "spec", "sync", "--spec-dir", str(spec))

    assert code == 0 and "regenerated" in out and str(spec) in out
    assert STALE not in (spec / "RECEIVER.md").read_text(encoding="utf-8")
    assert run_cli(capsys, "spec", "sync", "--spec-dir", str(spec), "--check")[0] == 0
    assert (SPEC / "RECEIVER.md").read_bytes() == ours, "the checkout's own document is left alone"


def test_spec_sync_defaults_to_the_checkout_it_runs_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``make docs`` runs ``epd-receiver spec sync`` from the checkout's root."""
    spec = copy_spec(tmp_path / "checkout" / "spec")
    monkeypatch.chdir(spec.parent)

    assert run_cli(capsys, "spec", "sync")[0] == 0
    assert STALE not in (spec / "RECEIVER.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("command", [["spec", "sync"], ["spec", "sync", "--check"], ["spec", "check"]])
def test_outside_a_checkout_the_spec_directory_must_be_named(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    code, out, err = run_cli(capsys, *command)

    assert code == 2 and out == ""
    assert "--spec-dir" in err and str(tmp_path / "spec") in err


@pytest.mark.parametrize("packages", ["site-packages", "dist-packages"])
@pytest.mark.parametrize("command", [["spec", "sync"], ["spec", "check"]])
def test_nothing_is_written_into_an_installed_package(
    packages: str, command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    installed = copy_spec(tmp_path / "lib" / "python3.11" / packages / "epd_receiver" / "spec")
    before = {p: p.read_bytes() for p in installed.rglob("*") if p.is_file()}

    code, out, err = run_cli(capsys, *command, "--spec-dir", str(installed))

    assert code == 2 and out == ""
    assert "installed package" in err and "--spec-dir" in err
    assert {p: p.read_bytes() for p in installed.rglob("*") if p.is_file()} == before
    assert not (installed / "node_modules").exists()


def test_a_spec_directory_without_the_spec_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "spec", "sync", "--spec-dir", str(tmp_path))

    assert code == 2 and "receiver.toml" in err and str(tmp_path) in err


def test_quint_is_never_to_be_installed_into_an_installed_package(tmp_path: Path) -> None:
    installed = copy_spec(tmp_path / "site-packages" / "epd_receiver" / "spec")

    with pytest.raises(QuintMissing) as missing:
        quint_binary(installed)

    assert f"`npm ci` in {installed}" not in str(missing.value)
    assert "not into the installed package" in str(missing.value) and "--spec-dir" in str(missing.value)


def test_spec_sync_refreshes_each_section_in_the_document_that_holds_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A generated section is refreshed in whichever document holds it: moved from one to the other and
    left stale there, it is regenerated in its new place and the first document is left alone."""
    spec = copy_spec(tmp_path / "spec")
    assert run_cli(capsys, "spec", "sync", "--spec-dir", str(spec))[0] == 0
    opening, closing = "<!-- generated:variants -->", "<!-- /generated:variants -->"
    documents = [spec / "RECEIVER.md", spec / "VERIFICATION.md"]
    holder, other = sorted(documents, key=lambda d: opening not in d.read_text(encoding="utf-8"))
    text = holder.read_text(encoding="utf-8")
    start, end = text.index(opening), text.index(closing) + len(closing)
    holder.write_text(text[:start] + text[end:], encoding="utf-8")
    other.write_text(other.read_text(encoding="utf-8") + f"{opening}\nSTALE-VARIANTS\n{closing}\n", encoding="utf-8")
    before = holder.read_bytes()

    code, out, _ = run_cli(capsys, "spec", "sync", "--spec-dir", str(spec))

    assert code == 0 and f"{other}: regenerated" in out and f"{holder}: up to date" in out
    assert "STALE-VARIANTS" not in other.read_text(encoding="utf-8")
    assert variants_markdown(spec / "scenarios" / "bugs") in other.read_text(encoding="utf-8")
    assert holder.read_bytes() == before
    assert run_cli(capsys, "spec", "sync", "--spec-dir", str(spec), "--check")[0] == 0
