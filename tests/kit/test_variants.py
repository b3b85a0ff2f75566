"""The fuzzer is sharp: every catalogued receiver bug, re-created as a variant, is caught.

Both directions are asserted: each variant breaks an invariant (or trips a guard) within the active
Hypothesis profile, and the unmodified controller passes the very same machine (tests/kit/test_stateful.py).
Each variant's recorded minimal schedule (spec/scenarios/bugs/) must reproduce the catch on replay and
be clean on the real controller.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from epd_receiver.adapters.kit.fuzz import Catch, hunt
from epd_receiver.adapters.kit.judge import label as catch_label
from epd_receiver.adapters.kit.scenario import replay
from epd_receiver.adapters.kit.variant_records import scenario_path, variants_markdown
from epd_receiver.adapters.kit.variants import CATALOGUE, PENDING, VARIANTS, Variant

ROOT = Path(__file__).parents[2]
BUGS = ROOT / "spec" / "scenarios" / "bugs"
CATCHES: list[Catch] = []
NEW = [v for v in CATALOGUE if v.bug is None]


@pytest.fixture(scope="module", autouse=True)
def report_catches() -> Any:
    """Print what caught each variant and how small the shrunk program was (visible with -s or on failure)."""
    yield
    for catch in CATCHES:
        print(f"{catch.variant:34} caught by {catch.by:18} in {catch.steps:3} steps, {catch.seconds:5.1f} s")


@pytest.mark.parametrize("variant", CATALOGUE, ids=[v.name for v in CATALOGUE])
def test_the_fuzzer_catches_the_variant(variant: Variant) -> None:
    catch = hunt(variant)
    CATCHES.append(catch)

    assert catch.caught, f"#{variant.bug} {variant.name} survived the fuzzer"
    assert catch.by in variant.caught_by, f"caught by {catch.by}: {catch.violation}"


@pytest.mark.parametrize("variant", CATALOGUE, ids=[v.name for v in CATALOGUE])
def test_recorded_minimal_schedule_breaks_the_variant_and_not_the_controller(variant: Variant) -> None:
    scenario = json.loads(scenario_path(BUGS, variant).read_text(encoding="utf-8"))
    assert scenario["variant"] == variant.name and scenario["bug"] == variant.bug

    broken = replay(scenario, rig=variant.rig, **variant.options())
    clean = replay(scenario)

    assert broken["violations"], "the recorded schedule no longer reproduces the bug"
    assert any(catch_label(v) == scenario["caught_by"] for v in broken["violations"]), broken["violations"]
    assert clean["violations"] == []


def test_catalogue_covers_the_receiver_side_bugs() -> None:
    required = {2, 3, 5, 6, 7, 14, 15, 17, 18, 20, 21, 22, 23, 24}
    assert required <= {v.bug for v in CATALOGUE}
    assert {4, 16} <= set(PENDING) | {v.bug for v in CATALOGUE}, "bugs without a variant must be listed as pending"
    assert len(VARIANTS) == len(CATALOGUE), "variant names are unique"


def test_variants_are_deviations_applied_from_outside() -> None:
    """No variant adds a switch to the product: each changes the spec by overlay, replaces one action, or
    (for a sender bug) rigs the bench's sender."""
    from epd_receiver.fsm import ReceiverQueue, ReceiverRequest

    for variant in CATALOGUE:
        deviates = variant.request_class is not ReceiverRequest or variant.queue_class is not ReceiverQueue
        assert variant.overlay or deviates or variant.rig, variant.name
        assert variant.spec() is not None  # the overlay yields a spec the loader accepts


def test_verification_md_variant_table_is_current() -> None:
    document = (ROOT / "spec" / "VERIFICATION.md").read_text(encoding="utf-8")
    assert variants_markdown(BUGS) in document, "run `epd-receiver spec sync`"


def test_a_violation_message_with_an_apostrophe_is_labelled_by_its_invariant() -> None:
    """repr() quotes such a message with double quotes; the label must still be the invariant's."""
    from epd_receiver.adapters.kit.fuzz import _first_violation

    error = AssertionError(repr(["rank 1: I5: the sender wrote room 0's data into block 2, which is free"]))
    assert catch_label(_first_violation(error)) == "I5"
    assert catch_label(_first_violation(RuntimeError("boom"))) == "RuntimeError"


@pytest.mark.parametrize("variant", NEW, ids=[v.name for v in NEW])
def test_a_property_beyond_safety_alone_catches_its_variant(variant: Variant) -> None:
    """In its recorded minimal schedule nothing but the property named speaks: the safety invariants
    (I1-I11) and the contracts alone would let this bug through."""
    scenario = json.loads(scenario_path(BUGS, variant).read_text(encoding="utf-8"))
    broken = replay(scenario, rig=variant.rig, **variant.options())

    assert broken["violations"]
    assert {catch_label(v) for v in broken["violations"]} == set(variant.caught_by)
