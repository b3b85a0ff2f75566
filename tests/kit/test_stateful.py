"""The real controller under the protocol fuzzer (adapters/kit/fuzz.py): every invariant after every step,
on one rank and on simulated tensor-parallel ranks that see statuses, clocks and aux rows differently."""

from __future__ import annotations

from typing import ClassVar

import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from epd_receiver.adapters.kit.fuzz import MultiRankProtocol, ReceiverProtocol, protocol_for
from epd_receiver.adapters.kit.geometry import BLOCK_SIZES
from epd_receiver.adapters.kit.world import World
from epd_receiver.adapters.kit.world_config import WorldConfig
from epd_receiver.fsm.config import first_allocation

ThreeRanks = protocol_for(None, ranks=3)
TestReceiverProtocol = ReceiverProtocol.TestCase
# one rank is the cheapest per step: it carries most of the budget of states judged
TestReceiverProtocol.settings = settings(TestReceiverProtocol.settings, max_examples=2 * settings().max_examples)

TestTwoRanks = MultiRankProtocol.TestCase
TestThreeRanks = ThreeRanks.TestCase
# three ranks cost half again as much per step; fewer examples keep the suite's budget
TestThreeRanks.settings = settings(TestThreeRanks.settings, max_examples=max(1, settings().max_examples // 2))

CI_STATES = 50_000  # what a CI run (the derandomized ``ci`` profile) must judge, over the three machines


def test_a_ci_run_judges_enough_states() -> None:
    """Runs last: the three machines above have run under this profile, and together judged this many world
    states (every invariant after every step)."""
    counts = [machine.__dict__.get("judged_states", 0) for machine in (ReceiverProtocol, MultiRankProtocol, ThreeRanks)]
    if settings().database is not None or not all(counts):
        pytest.skip("counts states only after a full run under the ci profile")
    print(f"fuzzer: {sum(counts)} states judged ({counts[0]} on one rank, {counts[1]} on two, {counts[2]} on three)")
    assert sum(counts) >= CI_STATES


class _RecordsItsPools(ReceiverProtocol):
    """The fuzzer, keeping every configuration ``a_pool`` drew and running no further."""

    drawn: ClassVar[list[WorldConfig]] = []

    def bench(self, config: WorldConfig, seed: int) -> World:
        type(self).drawn.append(config)
        return super().bench(config, seed)


def test_the_fuzzer_never_draws_a_first_allocation_larger_than_the_pool() -> None:
    """A queue refuses such a configuration; every other geometry is still drawn, A0 the whole pool included."""
    _RecordsItsPools.drawn = []
    budget = settings(max_examples=300, stateful_step_count=1, database=None, derandomize=True, deadline=None)
    run_state_machine_as_test(_RecordsItsPools, settings=budget)

    drawn = _RecordsItsPools.drawn
    too_big = [c for c in drawn if first_allocation(c.default_alloc_tokens, c.block_size) > c.num_blocks]
    assert not too_big, too_big[:3]
    assert any(first_allocation(c.default_alloc_tokens, c.block_size) == c.num_blocks for c in drawn)
    assert {c.num_blocks for c in drawn} >= {2, 24} and {c.block_size for c in drawn} == set(BLOCK_SIZES)
