"""#16, the Encode side's resume fan-in race, as a rig on the replicas' senders (variant ``eager-fan-in``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from epd_receiver.fsm import Room

if TYPE_CHECKING:
    from epd_receiver.adapters.kit.replicas import ReplicaWorld


class EagerFanIn:
    """#16, the Encode side's resume fan-in race, as a rig on the replicas' senders.

    One encode rank serves several Language ranks. The original started the resume chunk for all of them
    on the first resume message that arrived, aiming the ranks whose own resume had not arrived yet at
    the blocks they named last (their first allocation, already freed), and dropped their resumes when
    they came. A sender that waits for every rank's resume has no such race.
    """

    def __init__(self, world: ReplicaWorld) -> None:
        self._world = world
        self._started: dict[tuple[Room, int], int] = {}  # (room, sent) -> the rank whose resume started it
        for rank, replica in enumerate(world.ranks):
            replica.sender.on_resume = self._on_resume_of(rank, replica.sender.on_resume)  # type: ignore[method-assign]
            replica.judge.honest = False  # a sender with this bug owes no request success (I12)

    def _on_resume_of(self, rank: int, original: Callable[..., None]) -> Callable[..., None]:
        def on_resume(room: Room, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None:
            starter = self._started.setdefault((room, sent_tokens), rank)
            mine = self._world.ranks[rank].sender
            in_flight = mine.pending(room)
            original(room, blocks, sent_tokens, allocated_tokens)  # the message is received (and logged)
            if starter != rank:
                if in_flight is not None:  # ... and dropped: this rank's chunk already left, aimed at stale blocks
                    mine.aim(room, in_flight.blocks, in_flight.sent_tokens, in_flight.allocated_tokens)
                return
            for other in self._world.ranks:
                messages = other.sender.room_messages(room)
                if other.sender is not mine and messages:
                    other.sender.aim(room, messages[-1].blocks, sent_tokens, messages[-1].allocated_tokens)

        return on_resume
