"""What one Language rank knows of its rooms, learnt from the Encode side's frames alone; no socket here.

``MooncakeReceiver`` hands every frame its PULL socket receives to ``LanguageInbox.receive``, which is
total: a frame that cannot be right (malformed, truncated, a duplicate, stale, for a room or an Encode
rank this rank does not know) is logged with its peer and cause, counted in ``dropped[cause]``, and
changes nothing; a frame that is right changes exactly one room or peer.
"""

from __future__ import annotations

from dataclasses import dataclass

from epd_receiver.adapters.ports.mooncake import wire
from epd_receiver.fsm import KVPoll, Room


@dataclass(slots=True)
class RoomView:
    """One room as this rank knows it; every field but ``status``'s first value comes from the wire."""

    peer: str  # the Encode rank's host:port
    status: int = int(KVPoll.WaitingForInput)
    landed: int = 0
    reason: str | None = None
    stopped: bool = False  # latched: a terminal status or an abort acknowledgement arrived
    init_sent: bool = False
    abort: str = ""  # "", "wanted" (its peer has not said hello yet), "sent", "acked"
    error: str | None = None  # the link could not be set up: every poll raises


class LanguageInbox:
    """Applies decoded frames to the rooms; total over any frames, and counts what it drops."""

    def __init__(self, name: str, *, extended: bool) -> None:
        self.extended = extended
        self.rooms: dict[Room, RoomView] = {}
        self.speakers: dict[str, bool] = {}  # Encode endpoints registered with -> said hello
        self.drops = wire.DropLog(name)
        self.dropped = self.drops.counts

    def receive(self, frames: list[bytes], peer: str) -> str | None:
        """Apply one message; the endpoint of an Encode peer that has just said hello, else None."""
        message = wire.decode_to_language(frames, extended=self.extended)
        if isinstance(message, wire.Drop):
            self.drops.drop(message.cause, peer, message.detail)
        elif isinstance(message, wire.StatusReport):
            self._status(message, peer)
        elif isinstance(message, wire.AbortAck):
            self._ack(message.room, peer)
        else:
            return self._hello(message.endpoint, peer)
        return None

    def _status(self, report: wire.StatusReport, peer: str) -> None:
        view = self.rooms.get(report.room)
        where = f"{peer} (room {report.room})"
        if view is None:
            return self.drops.drop(wire.UNKNOWN_ROOM, where, f"status {report.status}")
        landed = view.landed if report.landed is None else report.landed
        if view.status in (KVPoll.Failed, KVPoll.Success):
            same = (report.status, landed) == (view.status, view.landed)
            return self.drops.drop(
                wire.DUPLICATE if same else wire.STALE, where, f"status {report.status} after the end"
            )
        if report.status != KVPoll.Failed and (report.status < view.status or landed < view.landed):
            return self.drops.drop(wire.STALE, where, f"status {report.status} landed {landed} went backwards")
        if report.status != KVPoll.Failed and (report.status, landed) == (view.status, view.landed):
            return self.drops.drop(wire.DUPLICATE, where, f"status {report.status} landed {landed} again")
        view.status, view.landed = report.status, landed
        if report.status in (KVPoll.Failed, KVPoll.Success):
            view.stopped = True
        if report.status == KVPoll.Failed:
            view.reason = report.reason or "the Encode side reported Failed (the fork's wire carries no reason)"

    def _ack(self, room: Room, peer: str) -> None:
        view = self.rooms.get(room)
        where = f"{peer} (room {room})"
        if view is None:
            self.drops.drop(wire.UNKNOWN_ROOM, where, "an abort acknowledgement")
        elif view.abort == "acked":
            self.drops.drop(wire.DUPLICATE, where, "the abort was acknowledged already")
        elif view.abort != "sent":
            self.drops.drop(wire.STALE, where, "an acknowledgement of an abort never sent")
        else:
            view.abort, view.stopped = "acked", True

    def _hello(self, endpoint: str, peer: str) -> str | None:
        if endpoint not in self.speakers:
            self.drops.drop(wire.UNKNOWN_PEER, peer, f"a hello from {endpoint}, an Encode rank never registered with")
        elif self.speakers[endpoint]:
            self.drops.drop(wire.DUPLICATE, peer, f"a second hello from {endpoint}")
        else:
            self.speakers[endpoint] = True
            return endpoint
        return None
