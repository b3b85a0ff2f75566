"""The receiver's ends of the in-process sender: the TransportLink port, one per room.

A link holds no state of its own; it forwards each call to the sender, which keeps every room's record,
so a link may be made again at any time (``InProcessSender.link``). A warm-up request's link stands alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from epd_receiver.fsm import KVPoll, Room

if TYPE_CHECKING:
    from epd_receiver.adapters.ports.sender import InProcessSender


class SenderLink:
    """The receiver's end of one room (the TransportLink port)."""

    __slots__ = ("_room", "_sender")

    def __init__(self, sender: InProcessSender, room: Room) -> None:
        self._sender = sender
        self._room = room

    def poll(self) -> int:
        return self._sender.poll(self._room)

    def init(self, blocks: Sequence[int], allocated_tokens: int) -> None:
        self._sender.on_init(self._room, blocks, allocated_tokens)

    def resume(self, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None:
        self._sender.on_resume(self._room, blocks, sent_tokens, allocated_tokens)

    def abort(self) -> None:
        self._sender.on_abort(self._room)

    def writes_stopped(self) -> bool:
        return self._sender.writes_stopped(self._room)

    def failure_reason(self) -> str | None:
        return self._sender.failure(self._room)


class ProgressSenderLink(SenderLink):
    """A link that also reports the tokens landed so far (the ProgressLink port): resumes in rounds."""

    __slots__ = ()

    def landed_tokens(self) -> int:
        return self._sender.reported_landed(self._room)


class WarmupLink:
    """The sender of a warm-up (health) request: ready at once, Success after the init, writes nothing."""

    __slots__ = ("inits",)

    def __init__(self) -> None:
        self.inits: list[tuple[tuple[int, ...], int]] = []

    def poll(self) -> int:
        return int(KVPoll.Success if self.inits else KVPoll.WaitingForInput)

    def init(self, blocks: Sequence[int], allocated_tokens: int) -> None:
        self.inits.append((tuple(blocks), allocated_tokens))

    def resume(self, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None:
        raise AssertionError("a warm-up request never resumes")

    def abort(self) -> None:
        pass

    def writes_stopped(self) -> bool:
        return True  # it never writes
