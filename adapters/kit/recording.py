"""The event log of a World: every call of its vocabulary is one replay event, and a run is a scenario.

A replay repeats a run exactly only if every event is logged once, by the call that made it; what a call
does on the World's behalf (a fair drain's steps, a landing the drain contract forces) is done quietly.
Every event, logged or not, bumps ``version``: what was judged before it may no longer hold.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from epd_receiver.adapters.kit.world_config import WorldConfig


class Recording:
    """The log of a World (mixed into it): the events so far, and whether they are being recorded."""

    config: WorldConfig
    seed: int
    bank_rows: int

    def _start_log(self, record: bool) -> None:
        self.log: list[dict[str, Any]] = []
        self._recording = record
        self.version = 0  # events so far, logged or not

    def _log(self, event: dict[str, Any]) -> None:
        self.version += 1  # every event passes here: what was judged before it may no longer hold
        if self._recording:
            self.log.append(event)

    @contextlib.contextmanager
    def _quietly(self) -> Iterator[None]:
        recording, self._recording = self._recording, False
        try:
            yield
        finally:
            self._recording = recording

    def scenario(self, **extra: Any) -> dict[str, Any]:
        """Everything this world went through, as a scenario that ``replay`` repeats exactly."""
        return {
            **extra,
            "config": dataclasses.asdict(self.config),
            "seed": self.seed,
            "bank_rows": self.bank_rows,
            "events": list(self.log),
        }
