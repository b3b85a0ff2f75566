"""The real controller under the protocol fuzzer (adapters/fuzz.py): every invariant after every step,
on one rank and on simulated tensor-parallel ranks that see statuses, clocks and aux rows differently."""

from __future__ import annotations

from hypothesis import settings

from epd_receiver.adapters.fuzz import MultiRankProtocol, ReceiverProtocol, protocol_for

TestReceiverProtocol = ReceiverProtocol.TestCase

TestTwoRanks = MultiRankProtocol.TestCase
TestThreeRanks = protocol_for(None, ranks=3).TestCase
# three ranks cost half again as much per step; fewer examples keep the suite's budget
TestThreeRanks.settings = settings(TestThreeRanks.settings, max_examples=max(1, settings().max_examples // 2))
