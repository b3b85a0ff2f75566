"""The Quint model and the controller cannot drift: model traces replayed through the real controller.

Over a thousand random traces of spec/receiver.qnt are generated with their actions and picks, applied
one by one to a World, and compared after every step (states, blocks held and fenced, cached totals,
landed counts, failure causes, the free list in order, the fenced rooms in order, the clock, the judge's
verdict). A controller that differs in one transition must make this fail.
Quint needs Node and `npm ci` in spec/; without them these tests skip, unless EPD_REQUIRE_QUINT is set
(as in CI), in which case they fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from epd_receiver.adapters.kit.conformance import Divergence, behaviours, model_config, replay_file
from epd_receiver.adapters.kit.quint import QuintMissing, check_all, generate_traces, quint_binary, spec_dir
from epd_receiver.adapters.kit.variants import VARIANTS

TRACES = 1000
MODEL = spec_dir() / "receiver.qnt"
# Behaviours the traces must reach, so that agreement covers deadlines, rounds, warm-ups, integrity and
# fences. (The model's live senders act on every abort before the drain deadline, so only a run test of
# the model reaches a fence that the drain deadline ends.)
EXERCISED = {
    "failed: timeout",
    "failed: integrity",
    "failed: pool_too_small",
    "failed: corrupt_aux",
    "failed: aborted",
    "failed: sender_failed",
    "several rounds",
    "warm-up succeeded",
    "checksum verified",
    "fenced after aborted",
    "fenced after timeout",
    "chunk landed in a fence",
    "fence lifted by a terminal status",
    "fence lifted by an ack",
}


@pytest.fixture(scope="module")
def quint() -> Path:
    try:
        return quint_binary()
    except QuintMissing as missing:
        if os.environ.get("EPD_REQUIRE_QUINT"):
            pytest.fail(str(missing))
        pytest.skip(str(missing))


@pytest.fixture(scope="module")
def traces(quint: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate_traces(tmp_path_factory.mktemp("itf"), TRACES)


def test_model_checks_pass(quint: Path) -> None:
    # No simulation of its own: generating the traces below checks every invariant after every step.
    for outcome in check_all(simulate=False):
        assert outcome.returncode == 0, f"{outcome.command}\n{outcome.output}"


def test_every_model_trace_is_followed_step_by_step_by_the_controller(traces: list[Path]) -> None:
    assert len(traces) >= TRACES
    config = model_config(MODEL)
    steps = 0
    exercised: set[str] = set()
    for trace in traces:
        replayed = replay_file(trace, config)  # raises Divergence with the trace and the first differing step
        steps += len(replayed) - 1
        exercised |= behaviours(replayed)
    assert steps >= TRACES * 10
    assert not EXERCISED - exercised, f"no trace reached {sorted(EXERCISED - exercised)}"


def test_a_controller_differing_in_one_transition_diverges(traces: list[Path]) -> None:
    """Hold A0 while waiting for the remainder (#24): one changed transition, and the traces notice."""
    variant = VARIANTS["hold-and-wait"]
    config = model_config(MODEL)
    divergences = []
    for trace in traces[:300]:
        try:
            replay_file(trace, config, spec=variant.spec(), request_class=variant.request_class)
        except Divergence as divergence:
            divergences.append(str(divergence))
    assert divergences, "the conformance check cannot tell a changed transition from the model"
    first = divergences[0]
    assert "disagree after step" in first and "trace_" in first and "room" in first
