"""The RankGroup port of tensor-parallel ranks simulated in one process: threads that take turns.

One rank runs at a time, in rank order, from one collective to the next, so a run is as deterministic as
a single-rank one and a failing schedule shrinks and replays. Every collective names itself: ranks that
made different collectives meet at different names, and every rank raises RankDivergence instead of
waiting forever.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from epd_receiver.fsm import Room
from epd_receiver.fsm.errors import RankDivergence

_PATIENCE_S = 30.0  # only a bug in this module could make a rank wait this long for its turn


class TakingTurns:
    """The collectives of ``size`` rank threads, run one at a time in rank order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._turn = 0
        self._done: set[int] = set()
        self._slots: list[tuple[str, Any] | None] = [None] * size
        self._gathered: list[tuple[str, Any] | None] = []
        self._cond = threading.Condition()

    def reset(self) -> None:
        """Every rank ended its iteration: the next one starts with rank 0 again."""
        with self._cond:
            self._turn, self._done, self._slots = 0, set(), [None] * self.size

    def begin(self, rank: int) -> None:
        """Wait until it is this rank's turn to run (rank 0 first)."""
        with self._cond:
            self._wait(lambda: self._turn == rank)

    def exchange(self, rank: int, name: str, value: Any) -> list[Any]:
        """Give ``value``, get every rank's; RankDivergence on every rank if they called different things."""
        with self._cond:
            self._slots[rank] = (name, value)
            if self._live_after(rank) is None:  # the last to arrive completes the round
                self._gathered = list(self._slots)
                self._slots = [None] * self.size
                self._pass_from(-1)
            else:
                self._pass_from(rank)
            self._wait(lambda: self._turn == rank)
            gathered = self._gathered
        names = {entry[0] if entry else "nothing (the rank had finished its iteration)" for entry in gathered}
        if len(names) > 1:
            raise RankDivergence(f"the ranks made different collectives: {sorted(names)}")
        return [entry[1] for entry in gathered if entry is not None]

    def end(self, rank: int) -> None:
        """This rank's iteration is over; let the next rank run."""
        with self._cond:
            self._done.add(rank)
            if self._live_after(rank) is None and any(self._slots):
                self._gathered = list(self._slots)  # peers wait in a round this rank will never join
                self._slots = [None] * self.size
                self._pass_from(-1)
            else:
                self._pass_from(rank)

    def _live_after(self, rank: int) -> int | None:
        return next((r for r in range(rank + 1, self.size) if r not in self._done), None)

    def _pass_from(self, rank: int) -> None:
        following = self._live_after(rank)
        self._turn = self.size if following is None else following
        self._cond.notify_all()

    def _wait(self, ready: Callable[[], bool]) -> None:
        if not self._cond.wait_for(ready, timeout=_PATIENCE_S):
            raise RuntimeError("a simulated rank waited for its turn for too long")


class SimulatedRank:
    """The RankGroup port of one simulated rank."""

    def __init__(self, turns: TakingTurns, rank: int) -> None:
        self._turns = turns
        self.rank = rank

    @property
    def size(self) -> int:
        return self._turns.size

    def min_reduce(self, rooms: Sequence[Room], values: Sequence[int]) -> list[int]:
        gathered = self._turns.exchange(self.rank, "min_reduce", (tuple(rooms), tuple(values)))
        if len({entry[0] for entry in gathered}) > 1:
            raise RankDivergence(f"the ranks polled different rooms: {[list(entry[0]) for entry in gathered]}")
        return [min(column) for column in zip(*(entry[1] for entry in gathered), strict=True)]

    def same(self, values: Sequence[int]) -> bool:
        return len({tuple(v) for v in self._turns.exchange(self.rank, "same", tuple(values))}) == 1
