"""What a faulty peer does to the receiver: the fault vocabulary of the bench, each fault a replay event.

Every fault marks its room as faulted (the request need not succeed, I12). A fault the receiver can
tell from what it sees must fail the request (I10), and then the room is expected to fail; a fault it
cannot tell (a lie the protocol has no way to expose) is not generated, since the judge would blame
the controller for a sender's undetectable lie. What the receiver can tell follows from the protocol:
the status it has already seen in its state, what the sender can truthfully report given the messages
it was sent, and the sizes and checksum the aux row must agree with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from epd_receiver.adapters.kit.recording import Recording
from epd_receiver.fsm import KVPoll, Room, State

if TYPE_CHECKING:
    from epd_receiver.adapters.kit.concluding import LocallyConcludingLink
    from epd_receiver.adapters.kit.judge import Judge, Outcome
    from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
    from epd_receiver.adapters.ports.sender import InProcessSender

_STATUSES = frozenset(int(value) for value in KVPoll)
# The least status the receiver has seen in each state, and the most its sender can truthfully report
# there: WaitingForInput before any init, Transferring while a remainder is owed and no resume was sent.
_FLOOR = {
    State.BOOTSTRAPPING: KVPoll.Bootstrapping,
    State.WAITING_FOR_INPUT: KVPoll.WaitingForInput,
    State.TRANSFERRING: KVPoll.WaitingForInput,
    State.WAITING_FOR_BLOCKS: KVPoll.Transferring,
    State.RESUMING: KVPoll.Transferring,
}
_CEILING = {
    State.BOOTSTRAPPING: KVPoll.WaitingForInput,
    State.WAITING_FOR_INPUT: KVPoll.WaitingForInput,
    State.TRANSFERRING: KVPoll.Success,
    State.WAITING_FOR_BLOCKS: KVPoll.Transferring,
    State.RESUMING: KVPoll.Success,
}
LINK_CALLS = ("poll", "init", "resume")


class Faults(Recording):
    """The faults of a World (mixed into it): a failing, dying, lying or garbling sender, a broken link."""

    queue: Any
    sender: InProcessSender
    pool: TorchBlockBuffers
    judge: Judge
    outcomes: dict[Room, Outcome]
    faulted: set[Room]
    config: Any
    _corrupted: set[tuple[Room, int]]
    _concluding: dict[Room, LocallyConcludingLink]

    def kill(self, room: Room) -> None:
        """The sender of ``room`` dies silently: it never writes or publishes again."""
        self._log({"kill": room})
        self.faulted.add(room)
        self.judge.silenced.add(room)
        if room in self.sender.rooms():
            self.sender.kill(room)

    def fail(self, room: Room) -> None:
        self._log({"fail": room})
        self.faulted.add(room)
        if room in self.sender.rooms():
            self.sender.fail(room)

    def go_backwards(self, room: Room) -> bool:
        """The sender answers the next poll with a status below one the receiver has already seen."""
        self._log({"backwards": room})
        self.faulted.add(room)
        request = self.queue.get(room)
        if request is None or request.state not in _FLOOR or _FLOOR[request.state] <= KVPoll.Bootstrapping:
            return False
        return self._misreport(room, int(_FLOOR[request.state]) - 1, alone=False)

    def misreport(self, room: Room, status: int, *, alone: bool = False) -> bool:
        """The sender answers the next poll with ``status``: outside KVPoll, Failed, below what the receiver
        has seen or above what it could truthfully say (then the request must fail), or a stale status
        (harmless). One that would be an undetectable lie is refused. ``alone``: on some ranks only, where
        a status above the others' vanishes under the MIN."""
        self._log({"misreport": {"room": room, "status": status}})
        self.faulted.add(room)
        return self._misreport(room, status, alone=alone)

    def misreport_landed(self, room: Room, delta: int, *, alone: bool = False, checked: bool = True) -> bool:
        """A sender that reports progress answers the next landed-count query ``delta`` tokens off, when a
        chunk has landed and is unread (the count is checked then); refused anywhere else. On several ranks
        the count is checked only if every rank's chunk has landed (``checked``), since the reduced status
        moves only then, and a count above the others' vanishes under the MIN (``alone``)."""
        self._log({"misreport": {"room": room, "landed": delta}})
        self.faulted.add(room)
        if not self.landed_misreport_applies(room, delta):
            return False
        request = self.queue.get(room)
        final = self.sender.status(room) is KVPoll.Success
        self.sender.misreport_landed(room, delta)
        caught = checked and (
            (delta < 0 and (final or request.state is State.TRANSFERRING)) or (delta > 0 and not alone)
        )
        if caught:
            self.judge.expect_failure.add(room)
        else:
            self.judge.silenced.add(room)  # a count that goes unnoticed delays the round: a deadline may pass
        return True

    def chunk_unread(self, room: Room) -> bool:
        """A chunk has landed and its status is out, and the receiver has not read it yet."""
        return self.first_chunk_unread(room) or self._round_unread(room)

    def landed_misreport_applies(self, room: Room, delta: int) -> bool:
        """A landed count ``delta`` off is checked at the next poll: a chunk has landed and is unread, and
        the count is not one the receiver reads as "no whole round yet"; one wrong answer at a time."""
        request = self.queue.get(room)
        if request is None or delta == 0 or not self.sender.has_progress(room) or self.sender.pending(room):
            return False
        if self.sender.misreport_pending(room) or room in self.judge.expect_failure:
            return False  # a second lie would overwrite the first, or hide one the receiver must catch
        landed, total = self.sender.sent_tokens(room), self.outcomes[room].total_tokens
        final = self.sender.status(room) is KVPoll.Success
        if landed + delta < 0 or not self.chunk_unread(room):
            return False
        return not (delta > 0 and request.state is State.RESUMING and not final and landed + delta >= total)

    def misreport_applies(self, room: Room, status: int) -> bool:
        """The next poll may answer ``status``: the request is live and its link will ask the sender, no
        other wrong answer is pending, and the value is no undetectable lie (ahead of the truth, yet within
        what the sender could truthfully say)."""
        request = self.queue.get(room)
        if request is None or request.state not in _FLOOR or room not in self.sender.rooms():
            return False
        if self.sender.misreport_pending(room) or self.sender.status(room) is KVPoll.Failed:
            return False  # one answer at a time, and a failed sender's Failed cannot be contradicted
        if room in self.judge.expect_failure:
            return False  # the room already carries a lie it must be failed for: a stale answer could hide it
        link = self._concluding.get(room)
        if link is not None and (link.concluded is not None or status == KVPoll.Success):
            return False  # such a link latches a terminal status: never asks again, or keeps a lie for good
        low, high = self._misreport_kind(request.state, status)
        return low or high or status <= self.sender.status(room)

    def break_link(self, room: Room, call: str) -> bool:
        """The link of ``room`` raises from now on whenever the controller calls ``call`` (a dead socket)."""
        self._log({"break": {"room": room, "call": call}})
        self.faulted.add(room)
        if call not in LINK_CALLS or room not in self.sender.rooms():
            return False
        self.sender.break_link(room, call)
        return True

    def corrupt_aux(self, room: Room, value: int) -> bool:
        """Overwrite T in the aux row of A0[0] after the first chunk landed and before it is read.

        Only with a value the receiver can tell is wrong: impossible, fitting A0 though the sender said
        Transferring, exceeding A0 though it said Success, or any other T when a checksum covers the payload.
        The checksum tells only at Success: below the truth, the sender may have more to write than the
        receiver's resume allows, and then waits for another resume, which the receiver (that believes the
        payload asked for) never sends, while the receiver waits for that Success: its deadline ends it.
        """
        self._log({"corrupt": {"room": room, "field": "total_tokens", "value": value}})
        self.faulted.add(room)
        if not self.first_chunk_unread(room) or self.sender.misreport_pending(room):
            return False  # with a wrong answer pending the receiver will not see the status the total must fit
        caught = self._total_caught_by(room, value)
        if caught is None:
            return False
        self.pool.aux[self.sender.room_messages(room)[0].blocks[0], 0] = value
        self.judge.expect_failure.add(room)
        if caught == "checksum" and value < self.outcomes[room].total_tokens:
            self.judge.silenced.add(room)
        return True

    def first_chunk_unread(self, room: Room) -> bool:
        """The first chunk has landed and its status is out, and the receiver has not read it yet."""
        request = self.queue.get(room)
        return (
            request is not None
            and request.state is State.TRANSFERRING
            and room in self.sender.rooms()
            and bool(self.sender.room_messages(room))
            and self.sender.pending(room) is None
            and self.sender.status(room) in (KVPoll.Transferring, KVPoll.Success)
        )

    def corrupt_data(self, room: Room) -> bool:
        """Flip one embedding value in a chunk that landed and has not been read yet (checksummed rooms only).

        Without a checksum nothing could tell, so the bench does not do it to such a room.
        """
        self._log({"corrupt": {"room": room, "field": "embeddings"}})
        self.faulted.add(room)
        request = self.queue.get(room)
        if (
            request is None
            or room not in self.sender.rooms()
            or self.sender.source(room).checksum is None
            or request.state not in (State.TRANSFERRING, State.RESUMING)
            or self.sender.pending(room) is not None
            or not self.sender.room_messages(room)
        ):
            return False
        block = self.sender.room_messages(room)[-1].blocks[0]
        if (room, block) in self._corrupted:
            return False  # a second flip of the same value would undo the first
        self._corrupted.add((room, block))
        bits = self.pool.embeddings[block, :1].view(torch.int16)
        bits ^= 1  # the lowest mantissa bit: a different value whatever the value was
        self.judge.expect_failure.add(room)
        return True

    # ---- helpers ---------------------------------------------------------------------------------

    def _misreport(self, room: Room, status: int, *, alone: bool) -> bool:
        if not self.misreport_applies(room, status):
            return False
        low, high = self._misreport_kind(self.queue.get(room).state, status)
        self.sender.misreport(room, status)
        if low or (high and not alone):
            self.judge.expect_failure.add(room)
        else:
            self.judge.silenced.add(room)  # a stale answer delays the sender's news: a deadline may pass first
        return True

    @staticmethod
    def _misreport_kind(state: State, status: int) -> tuple[bool, bool]:
        """(low, high): below what the receiver has seen (or no status, or Failed), which reaches every rank
        under the MIN; above what the sender could truthfully say, which a lower answer on another rank hides."""
        low = status not in _STATUSES or status == KVPoll.Failed or status < _FLOOR[state]
        high = status in _STATUSES and status > _CEILING[state]
        return low, high

    def _round_unread(self, room: Room) -> bool:
        """A resume's chunk has landed and its status is out, and the receiver has not read it yet."""
        request = self.queue.get(room)
        return (
            request is not None
            and request.state is State.RESUMING
            and len(self.sender.room_messages(room)) > 1
            and self.sender.pending(room) is None
        )

    def _total_caught_by(self, room: Room, value: int) -> str | None:
        """How the receiver can tell ``value`` is not T: by reading it against the status ("read"), by the
        checksum at Success ("checksum"), or not at all (None)."""
        first = self.sender.room_messages(room)[0]
        allocated = len(first.blocks) * self.config.block_size
        if not 0 < value <= self.config.max_total_tokens:
            return "read"
        if value == self.outcomes[room].total_tokens:
            return None
        transferring = self.sender.status(room) is KVPoll.Transferring
        if value <= allocated if transferring else value > allocated:
            return "read"
        return "checksum" if self.sender.source(room).checksum is not None else None
