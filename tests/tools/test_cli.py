"""The ``epd-receiver`` command line: simulate, replay and spec diagram, as an operator would run them.

The CLI is how a reviewer reproduces a protocol case (a replayed scenario), checks the whole bench end to
end (a simulated workload, every payload verified, no block leaked) and reads the spec (the diagram).
Its JSON is what scripts consume and its exit codes are what CI branches on, so both are pinned here:
0 for a clean run, 2 for a scenario that is itself malformed, with the reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from epd_receiver.adapters.kit.quint import QuintMissing, quint_binary
from epd_receiver.adapters.kit.variant_records import variants_markdown
from epd_receiver.adapters.kit.world_config import WorldConfig
from epd_receiver.adapters.tools.arguments import parser
from epd_receiver.adapters.tools.cli import main
from epd_receiver.adapters.tools.simulate import Workload, simulate
from epd_receiver.fsm import State

SEED_CONFIG = {"block_size": 128, "num_blocks": 160, "default_alloc_tokens": 8192, "hidden_size": 8}
SEED_REQUESTS = [{"room": 1, "total_tokens": 16384}]
# The seed case: the first chunk lands, the receiver resumes, Transferring is seen again five times while
# the remainder is in flight (no second aux read, no second resume), then the remainder lands.
SEED_EVENTS: list[dict[str, Any]] = [{"step": 1}, {"deliver": 1}, {"step": 1}, {"step": 5}, {"deliver": 1}, {"step": 1}]
SUMMARY_KEYS = {
    "requests",
    "succeeded",
    "failed",
    "resumed",
    "verified",
    "max_reads_per_request",
    "leaked_blocks",
}


def write_scenario(tmp_path: Path, scenario: dict[str, Any] | str, name: str = "scenario.json") -> Path:
    path = tmp_path / name
    path.write_text(scenario if isinstance(scenario, str) else json.dumps(scenario), encoding="utf-8")
    return path


def seed_scenario(*extra_events: dict[str, Any]) -> dict[str, Any]:
    return {"config": SEED_CONFIG, "requests": SEED_REQUESTS, "events": [*SEED_EVENTS, *extra_events]}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def replay_json(capsys: pytest.CaptureFixture[str], path: Path) -> tuple[int, dict[str, Any]]:
    code, out, err = run_cli(capsys, "replay", str(path))
    assert err == ""
    return code, json.loads(out)


# ---- simulate -------------------------------------------------------------------------------------


SIMULATE_ARGS = (
    "simulate",
    "--requests",
    "12",
    "--hidden-size",
    "16",
    "--num-blocks",
    "64",
    "--block-size",
    "16",
    "--default-alloc",
    "128",
    "--no-progress",
)


def test_simulate_json_summary_is_clean_and_exercises_resumes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, *SIMULATE_ARGS, "--json")
    summary = json.loads(out)

    assert code == 0
    assert set(summary) >= SUMMARY_KEYS
    assert summary["requests"] == 12
    assert summary["succeeded"] + summary["failed"] == 12
    assert summary["verified"] == summary["succeeded"]
    assert summary["leaked_blocks"] == 0
    assert summary["max_reads_per_request"] <= 2
    assert summary["resumed"] >= 1
    assert summary["violations"] == []


def test_simulate_without_json_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, *SIMULATE_ARGS)

    assert code == 0
    assert "succeeded" in out and "leaked blocks" in out


# ---- spec diagram -----------------------------------------------------------------------------------


def test_spec_diagram_prints_a_mermaid_state_diagram_of_every_state(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "spec", "diagram")

    assert code == 0
    assert "stateDiagram-v2" in out.splitlines()
    for state in State:
        assert state.name in out


# ---- replay -----------------------------------------------------------------------------------------


def test_replay_of_the_seed_case_succeeds_with_two_reads_and_one_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = replay_json(capsys, write_scenario(tmp_path, seed_scenario()))

    assert code == 0
    assert report["requests"]["1"] == {
        "state": "SUCCESS",
        "reads": 2,
        "resumes": 1,
        "verified": True,
        "error": None,
    }
    assert report["violations"] == []
    assert report["pool"]["owned"] == 64  # A1 is held until the caller releases it
    assert report["pool"]["double_frees"] == 0


def test_replay_release_returns_every_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = replay_json(capsys, write_scenario(tmp_path, seed_scenario({"release": 1})))

    assert code == 0
    assert report["requests"]["1"]["state"] == "SUCCESS"
    assert report["pool"] == {"free": 160, "owned": 0, "fenced": 0, "double_frees": 0}
    assert report["violations"] == []


def test_replay_sender_failure_mid_resume_fails_the_request_and_frees_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [{"step": 1}, {"deliver": 1}, {"step": 1}, {"fail": 1}, {"step": 1}]
    scenario = {"config": SEED_CONFIG, "requests": SEED_REQUESTS, "events": events}
    code, report = replay_json(capsys, write_scenario(tmp_path, scenario))

    assert code == 0
    outcome = report["requests"]["1"]
    assert outcome["state"] == "FAILED"
    assert outcome["error"] is not None and "room 1" in outcome["error"]
    assert outcome["verified"] is False
    assert report["pool"]["owned"] == 0
    assert report["violations"] == []


def test_replay_accepts_requests_arriving_as_events(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = {
        "config": SEED_CONFIG,
        "events": [{"arrive": {"room": 3, "total_tokens": 100}}, {"step": 1}, {"deliver": 3}, {"step": 1}],
    }
    code, report = replay_json(capsys, write_scenario(tmp_path, scenario))

    assert code == 0
    assert report["requests"]["3"]["state"] == "SUCCESS"
    assert report["requests"]["3"]["reads"] == 1


@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(seed_scenario({"bogus": 1}), id="unknown-event"),
        pytest.param(seed_scenario({"step": 1, "deliver": 1}), id="two-events-in-one"),
        pytest.param({"config": SEED_CONFIG, "events": ["step"]}, id="event-not-an-object"),
        pytest.param({"requests": SEED_REQUESTS, "events": SEED_EVENTS}, id="missing-config"),
        pytest.param({"config": {"block_size": 128}, "events": []}, id="incomplete-config"),
        pytest.param([1, 2, 3], id="not-an-object"),
        pytest.param({"config": SEED_CONFIG, "requests": [{"room": 1}]}, id="request-without-total"),
        pytest.param(seed_scenario({"deliver": 99}), id="unknown-room-deliver"),
        pytest.param(seed_scenario({"fail": 99}), id="unknown-room-fail"),
        pytest.param(seed_scenario({"abort": 99}), id="unknown-room-abort"),
        pytest.param(seed_scenario({"release": 99}), id="unknown-room-release"),
        pytest.param(seed_scenario({"late": 99}), id="unknown-room-late"),
        pytest.param(seed_scenario({"step": "x"}), id="non-integer-argument"),
        pytest.param(seed_scenario({"arrive": {"room": 1, "total_tokens": 5}}), id="duplicate-room"),
        pytest.param({"config": {**SEED_CONFIG, "num_blocks": 0}}, id="empty-pool"),
        pytest.param({"config": {**SEED_CONFIG, "num_blocks": 2, "default_alloc_tokens": 10**5}}, id="a0-past-pool"),
        pytest.param({"config": SEED_CONFIG, "requests": [{"room": 1, "total_tokens": 0}]}, id="empty-request"),
    ],
)
def test_replay_of_a_malformed_scenario_exits_2_with_a_message_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], scenario: Any
) -> None:
    code, out, err = run_cli(capsys, "replay", str(write_scenario(tmp_path, scenario)))

    assert code == 2
    assert out == ""
    assert err.startswith("epd-receiver replay: ")


def test_replay_of_invalid_json_or_a_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "replay", str(write_scenario(tmp_path, "{not json")))
    assert code == 2 and "epd-receiver replay:" in err

    code, _, err = run_cli(capsys, "replay", str(tmp_path / "absent.json"))
    assert code == 2 and "absent.json" in err


def test_usage_errors_exit_through_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["no-such-command"])
    assert raised.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# ---- the installed entry point ------------------------------------------------------------------------


def test_console_script_is_declared_for_main() -> None:
    (script,) = entry_points(group="console_scripts", name="epd-receiver")
    assert script.value == "epd_receiver.adapters.tools.cli:main"


def test_installed_console_script_replays_a_scenario(tmp_path: Path) -> None:
    beside = Path(sys.executable).parent / "epd-receiver"
    executable = str(beside) if beside.exists() else shutil.which("epd-receiver")
    assert executable is not None, "the epd-receiver console script is not installed"
    path = write_scenario(tmp_path, seed_scenario({"release": 1}))

    result = subprocess.run([executable, "replay", str(path)], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["requests"]["1"]["state"] == "SUCCESS"
    assert report["pool"]["owned"] == 0


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["simulate", "--num-blocks", "0"], "--num-blocks: must be a positive whole number, not 0"),
        (["simulate", "--deliver-prob", "-1"], "--deliver-prob: must be above 0 and at most 1"),
        (["simulate", "--deliver-prob", "0"], "--deliver-prob: must be above 0 and at most 1"),
        (["simulate", "--abort-rate", "1.5"], "--abort-rate: must be between 0 and 1"),
        (["simulate", "--deepstack", "-2"], "--deepstack: must not be negative"),
        (["simulate", "--requests", "many"], "--requests: not a whole number: 'many'"),
        (["bench", "--threads", "0"], "--threads: must be a positive whole number"),
        (["walk", "--steps", "-5"], "--steps: must be a positive whole number"),
        (["walk", "--steps", "-1"], "--steps: must be a positive whole number"),
        (["walk", "--ranks", "4"], "--ranks: invalid choice"),
        (
            ["simulate", "--num-blocks", "2", "--default-alloc-tokens", "100000"],
            "default_alloc_tokens=100000 needs 782 blocks of block_size=128 tokens, more than the pool's num_blocks=2",
        ),
        (["simulate", "--num-blocks", "1", "--block-size", "4", "--default-alloc", "5"], "num_blocks=1"),
        (["explore", "--depth", "0"], "--depth: must be a positive whole number"),
        (["explore", "--ranks", "3"], "--ranks: invalid choice"),
        (["explore", "--variant", "no-such-bug"], "--variant: invalid choice"),
        (["bench", "--total-tokens", "100"], "--total-tokens 100 fits in A0"),
        (["bench", "--block-sizes", "0"], "--block-sizes: must be a positive whole number"),
        (["replay"], "the following arguments are required: scenario"),
        (["replay", "x.json", "--variant", "no-such-bug"], "--variant: invalid choice"),
        (["variants", "no-such-bug"], "unknown variant 'no-such-bug'"),
        (["spec", "check", "--samples", "0"], "--samples: must be a positive whole number"),
    ],
)
def test_an_impossible_value_is_refused_by_the_parser_with_status_2(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert says in capsys.readouterr().err


def subparsers(top: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its name, nested commands as ``spec check``."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                prefix = command.prog.split(" ", 1)[1]
                found[prefix] = command
                found |= subparsers(command)
    return found


COMMANDS = subparsers(parser())


def test_help_lists_every_command_with_one_line_each(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as stopped:
        main(["--help"])
    assert stopped.value.code == 0
    listing = capsys.readouterr().out
    commands = listing[listing.index("  COMMAND\n") : listing.index("\noptions:")].splitlines()[1:]
    top = [name for name in COMMANDS if " " not in name]
    assert set(top) == {"simulate", "bench", "replay", "variants", "explore", "walk", "spec"}
    assert [line.split()[0] for line in commands if line.strip()] == top, "one line per command, in order"
    for line in commands:
        assert len(line.split(maxsplit=1)) == 2, f"{line.strip()}: no help line"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_shows_its_default(name: str) -> None:
    """Each option with a default says it in its help; a None default is named in the help or not at all."""
    command = COMMANDS[name]
    shown = command.format_help()
    assert command.formatter_class is not argparse.HelpFormatter
    for action in command._actions:
        if not action.option_strings or action.default in (None, argparse.SUPPRESS):
            continue
        text = command._get_formatter()._format_action(action)
        assert "(default:" in text and str(action.default) in " ".join(text.split()), (name, action.dest)
    assert "(default: None)" not in shown


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


def test_a_simulation_whose_first_allocation_cannot_fit_the_pool_is_refused_before_it_runs() -> None:
    """No request could ever be admitted: the run would only spin to its iteration limit."""
    config = WorldConfig(block_size=128, num_blocks=2, default_alloc_tokens=100_000, hidden_size=8)

    with pytest.raises(ValueError, match="default_alloc_tokens=100000 needs 782 blocks"):
        simulate(config, Workload(requests=1, max_iterations=50))


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
