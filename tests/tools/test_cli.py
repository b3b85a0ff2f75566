"""The ``epd-receiver`` command line: simulate and replay, as an operator would run them.

The CLI is how a reviewer reproduces a protocol case (a replayed scenario) and checks the whole bench end
to end (a simulated workload, every payload verified, no block leaked). Its JSON is what scripts consume
and its exit codes are what CI branches on, so both are pinned here: 0 for a clean run, 2 for a scenario
that is itself malformed, with the reason on stderr. The parser is pinned in ``test_cli_parser.py``, the
``spec`` commands in ``test_cli_spec.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from support.command_line import run_cli

from epd_receiver.adapters.kit.world_config import WorldConfig
from epd_receiver.adapters.tools.simulate import Workload, simulate

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


def test_a_simulation_whose_first_allocation_cannot_fit_the_pool_is_refused_before_it_runs() -> None:
    """No request could ever be admitted: the run would only spin to its iteration limit."""
    config = WorldConfig(block_size=128, num_blocks=2, default_alloc_tokens=100_000, hidden_size=8)

    with pytest.raises(ValueError, match="default_alloc_tokens=100000 needs 782 blocks"):
        simulate(config, Workload(requests=1, max_iterations=50))


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
