"""The shipped scenarios in spec/scenarios/ are executable documentation: each states what must happen.

Every scenario carries an ``expect`` block; replaying it must match that block and violate no invariant.
The seed bug's case gets its own test, since it is the regression this project exists to prevent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from epd_receiver.adapters.kit.scenario import load_scenario, replay

SCENARIOS = sorted((Path(__file__).parents[2] / "spec" / "scenarios").glob("*.json"))


def test_scenarios_are_shipped() -> None:
    assert {p.name for p in SCENARIOS} >= {"seed-resume-get-buf.json", "full-pool-no-deadlock.json"}


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_replays_as_its_expect_block_says(path: Path) -> None:
    scenario = load_scenario(path)
    report = replay(scenario)

    assert report["violations"] == []
    expected: dict[str, Any] = scenario["expect"]
    for room, fields in expected["requests"].items():
        got = report["requests"][room]
        assert {k: got[k] for k in fields} == fields, f"room {room}"
    assert report["pool"] == expected["pool"]


def test_seed_case_reads_the_pool_exactly_twice_and_assembles_the_whole_payload() -> None:
    """After the resume, Transferring is polled eight more times and arrives once more; nothing is read."""
    scenario = json.loads((SCENARIOS[0].parent / "seed-resume-get-buf.json").read_text())
    report = replay(scenario)

    room = report["requests"]["1"]
    assert (room["state"], room["reads"], room["resumes"], room["verified"]) == ("SUCCESS", 2, 1, True)
    assert report["violations"] == []
    assert report["pool"] == {"free": 128, "owned": 0, "fenced": 0, "double_frees": 0}


def test_a_block_size_that_differs_between_the_sides_fails_naming_the_cause() -> None:
    report = replay(load_scenario(SCENARIOS[0].parent / "block-size-mismatch.json"))
    error = report["requests"]["1"]["error"]
    assert error.startswith("room 1: sender_failed:") and "block size mismatch" in error and "B=256" in error
