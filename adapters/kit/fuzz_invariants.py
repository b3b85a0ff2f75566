"""The fuzzer's invariants: one per property of spec/RECEIVER.md §5, so that a failure names the property it
broke, and one for the controller's own contracts (every other label). Each is the judge's verdict on the
world (``World.check``), computed once per event however many invariants ask."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from hypothesis.stateful import invariant

from epd_receiver.adapters.kit.judge import label as catch_label
from epd_receiver.adapters.kit.world import World

PROPERTIES = frozenset(f"I{n}" for n in range(1, 15))
INVARIANT_NAME = re.compile(r"i\d+_\w+|the_controller_keeps_its_contracts")  # the invariants' methods


class PropertyInvariants:
    """Mixed into the fuzzer's state machines, which provide ``world`` and ``_seen`` (the views of this event)."""

    world: World
    judged_states: ClassVar[int]  # world states the judge ruled on, over every run of the class

    def _seen(self) -> dict[Any, Any]:
        raise NotImplementedError

    def _violations(self, *labels: str) -> list[str]:
        """What the judge found under ``labels`` (every other label, when none is named); judged once per event."""
        views = self._seen()
        if "judged" not in views:
            views["judged"] = found = self.world.check()
            type(self).judged_states += 1
        else:
            found = views["judged"]
        if labels:
            return [v for v in found if catch_label(v) in labels]
        return [v for v in found if catch_label(v) not in PROPERTIES]

    # One invariant per property (spec/RECEIVER.md §5), so that a failure names the property it broke.

    @invariant()
    def i1_reads_only_landed_blocks(self) -> None:
        assert not self._violations("I1"), self._violations("I1")

    @invariant()
    def i2_one_aux_read_by_value(self) -> None:
        assert not self._violations("I2"), self._violations("I2")

    @invariant()
    def i3_message_arithmetic(self) -> None:
        assert not self._violations("I3"), self._violations("I3")

    @invariant()
    def i4_one_resume_per_stage(self) -> None:
        assert not self._violations("I4"), self._violations("I4")

    @invariant()
    def i5_every_block_has_one_holder(self) -> None:
        assert not self._violations("I5"), self._violations("I5")

    @invariant()
    def i6_payload_is_what_was_sent(self) -> None:
        assert not self._violations("I6"), self._violations("I6")

    @invariant()
    def i7_states_move_forward(self) -> None:
        assert not self._violations("I7"), self._violations("I7")

    @invariant()
    def i8_nothing_waits_forever(self) -> None:
        assert not self._violations("I8"), self._violations("I8")

    @invariant()
    def i9_ranks_agree(self) -> None:
        assert not self._violations("I9"), self._violations("I9")

    @invariant()
    def i10_bad_input_fails_closed(self) -> None:
        assert not self._violations("I10"), self._violations("I10")

    @invariant()
    def i11_warmups_touch_nothing(self) -> None:
        assert not self._violations("I11"), self._violations("I11")

    @invariant()
    def i12_good_requests_succeed(self) -> None:
        assert not self._violations("I12"), self._violations("I12")

    @invariant()
    def i13_deadlines_are_not_early(self) -> None:
        assert not self._violations("I13"), self._violations("I13")

    @invariant()
    def i14_allocation_serves_the_head_first(self) -> None:
        assert not self._violations("I14"), self._violations("I14")

    @invariant()
    def the_controller_keeps_its_contracts(self) -> None:
        """ReadOutsideWindow, OwnershipError, RankDivergence, or a crash: our own discipline broken."""
        assert not self._violations(), self._violations()
