"""The Encode side in process: the original sender's semantics, writing into the receiver's rows.

It keeps what the real one keeps: per room a source of T tokens, the sender's own ``sent_tokens``
(overwritten by a resume, as the original does), the pending chunk, and a status that only goes up
except for the jump to Failed. A first chunk writes ``min(T, allocated)`` tokens and the aux row of its
first block; a resume writes from source block ``sent_tokens // B`` on, without aux. Every message the
receiver sent is logged, so tests can judge the receiver by what the sender saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.sender_links import ProgressSenderLink, SenderLink
from epd_receiver.adapters.ports.source import EmbeddingBank, SourcePayload
from epd_receiver.fsm import ChecksumAlgorithm, KVPoll, Room

# What the sender writes (source.py) and its links (sender_links.py) are still importable from here.
VOCAB = 151_936
_TERMINAL = (KVPoll.Failed, KVPoll.Success)


@dataclass(frozen=True, slots=True)
class Message:
    room: Room
    kind: Literal["init", "resume"]
    blocks: tuple[int, ...]
    sent_tokens: int
    allocated_tokens: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """A write the sender has been asked for and has not landed yet."""

    blocks: tuple[int, ...]
    sent_tokens: int
    allocated_tokens: int

    @property
    def with_aux(self) -> bool:
        return self.sent_tokens == 0


@dataclass(slots=True)
class _Room:
    source: SourcePayload
    status: KVPoll
    sent_tokens: int = 0
    pending: Chunk | None = None
    handshake_pending: bool = False
    progress: bool = False
    misreport: int | None = None  # a faulty sender's next poll answer, whatever it really reported
    landed_off: int = 0  # a faulty sender's next landed count is this many tokens off
    broken: set[str] = field(default_factory=set)  # link calls that raise: the socket is dead
    dead: bool = False
    abort_queued: bool = False  # the receiver's abort arrived and the sender has not acted on it yet
    stopped: bool = False  # the sender acted on an abort: no more writes, and it says so when asked
    failure: str | None = None
    messages: list[Message] = field(default_factory=list)
    published: list[KVPoll] = field(default_factory=list)


class InProcessSender:
    def __init__(
        self,
        buffers: TorchBlockBuffers,
        *,
        seed: int = 0,
        bank_rows: int = 4096,
        block_size: int | None = None,
        async_abort: bool = False,
    ) -> None:
        self.buffers = buffers
        # A real sender learns of an abort by a message and may be mid-write when it does: with
        # ``async_abort`` the abort only queues, and the pending chunk can still land until ``act_on_abort``.
        self.async_abort = async_abort
        self.writes: list[tuple[Room, int]] = []  # (room, block) of every row written, in order
        # The Encode side's own configured B (in SGLang each side reads it from its own environment).
        self.block_size = block_size or buffers.block_size
        self.bank = EmbeddingBank(buffers.hidden_size, buffers.deepstack_layers, rows=bank_rows, seed=seed)
        self._seed = seed
        self._rooms: dict[Room, _Room] = {}
        self.messages: list[Message] = []

    # ---- rooms -----------------------------------------------------------------------------------

    def add_room(
        self,
        room: Room,
        total_tokens: int,
        mrope_delta: int | None = None,
        *,
        handshake_done: bool = True,
        progress: bool = False,
        checksum: bool = False,
        checksum_algorithm: ChecksumAlgorithm = ChecksumAlgorithm.XXH3_64,
    ) -> SenderLink:
        """Encode a request of ``total_tokens`` tokens; the source is seeded by the sender's seed and the room."""
        if room in self._rooms:
            raise ValueError(f"room {room} already exists")
        if total_tokens <= 0:
            raise ValueError(f"room {room}: total_tokens must be positive")
        generator = torch.Generator().manual_seed(self._seed * 1_000_003 + room)
        fill_ids = torch.randint(0, VOCAB, (total_tokens,), generator=generator, dtype=torch.int32)
        mrope = torch.randint(0, 1 << 20, (3, total_tokens), generator=generator, dtype=torch.int32)
        if mrope_delta is None:
            mrope_delta = int(torch.randint(-4096, 4096, (1,), generator=generator))
        source = SourcePayload(self.bank, fill_ids, mrope, mrope_delta)
        if checksum:
            source.checksum, source.checksum_algorithm = source.digest(checksum_algorithm), checksum_algorithm
        status = KVPoll.WaitingForInput if handshake_done else KVPoll.Bootstrapping
        self._rooms[room] = _Room(source, status, handshake_pending=not handshake_done, progress=progress)
        return self.link(room)

    def link(self, room: Room) -> SenderLink:
        """The receiver's end of ``room``; it reports progress if the room was added with ``progress``."""
        return ProgressSenderLink(self, room) if self._rooms[room].progress else SenderLink(self, room)

    def has_progress(self, room: Room) -> bool:
        return room in self._rooms and self._rooms[room].progress

    def source(self, room: Room) -> SourcePayload:
        return self._rooms[room].source

    def status(self, room: Room) -> KVPoll:
        return self._rooms[room].status

    def misreport(self, room: Room, status: int) -> None:
        """A faulty sender: its next poll answer is ``status``, whatever it reported before."""
        self._rooms[room].misreport = int(status)

    def misreport_pending(self, room: Room) -> bool:
        state = self._rooms.get(room)
        return state is not None and (state.misreport is not None or state.landed_off != 0)

    def misreport_landed(self, room: Room, delta: int) -> None:
        """A faulty sender: its next landed count is ``delta`` tokens off."""
        self._rooms[room].landed_off = delta

    def reported_landed(self, room: Room) -> int:
        """What the receiver's landed-count query sees: the truth, or a faulty sender's one-off error."""
        state = self._rooms[room]
        off, state.landed_off = state.landed_off, 0
        return state.sent_tokens + off

    def break_link(self, room: Room, call: str) -> None:
        """From now on the receiver's ``call`` on this room's link raises, as over a dead socket."""
        self._rooms[room].broken.add(call)

    def is_broken(self, room: Room) -> bool:
        state = self._rooms.get(room)
        return state is not None and bool(state.broken)

    def _raise_if_broken(self, room: Room, call: str) -> None:
        if call in self._rooms[room].broken:
            raise ConnectionResetError(f"room {room}: {call} over a dead link")

    def poll(self, room: Room) -> int:
        """What the receiver's poll sees: the status table, or a faulty sender's one-off misreport."""
        self._raise_if_broken(room, "poll")
        state = self._rooms[room]
        if state.misreport is not None:
            value, state.misreport = state.misreport, None
            return int(value)
        return int(state.status)

    def pending(self, room: Room) -> Chunk | None:
        """The chunk not landed yet for ``room``; None also for a room this sender does not serve."""
        state = self._rooms.get(room)
        return None if state is None else state.pending

    def failure(self, room: Room) -> str | None:
        return self._rooms[room].failure

    def sent_tokens(self, room: Room) -> int:
        return self._rooms[room].sent_tokens

    def room_messages(self, room: Room) -> list[Message]:
        state = self._rooms.get(room)
        return [] if state is None else state.messages

    def rooms(self) -> list[Room]:
        return list(self._rooms)

    def room_record(self, room: Room) -> dict[str, object]:
        """What the sender keeps of ``room`` that shapes how it goes on, by name, in a fixed order (to read,
        not to change): all but the source, which the room's seed and total determine, and the raw list of
        published statuses (``published`` gives them as the receiver can see them)."""
        state = self._rooms[room]
        skipped = ("source", "published")
        return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name not in skipped}

    def writing_blocks(self) -> set[int]:
        """Blocks a pending chunk will write: nobody may read them before the status says they landed.
        A dead sender's chunk will never land, so it writes nothing."""
        return {b for r in self._rooms.values() if r.pending and not r.dead for b in r.pending.blocks}

    def forget(self, room: Room) -> None:
        del self._rooms[room]

    # ---- what the receiver sends -----------------------------------------------------------------

    def on_init(self, room: Room, blocks: Sequence[int], allocated_tokens: int) -> None:
        state = self._record(room, "init", blocks, 0, allocated_tokens)
        self._raise_if_broken(room, "init")  # the message is on record, but the sender never acts on it
        if state.status is KVPoll.Failed:
            return
        if self._check_geometry(state, blocks, allocated_tokens):
            state.pending = Chunk(tuple(blocks), 0, allocated_tokens)

    def on_resume(self, room: Room, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None:
        state = self._record(room, "resume", blocks, sent_tokens, allocated_tokens)
        self._raise_if_broken(room, "resume")
        if state.status is not KVPoll.Transferring:
            return  # the original drops a resume for a room it no longer tracks
        if self._check_geometry(state, blocks, allocated_tokens):
            state.sent_tokens = sent_tokens
            state.pending = Chunk(tuple(blocks), sent_tokens, allocated_tokens)

    def aim(self, room: Room, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None:
        """The sender decides by itself to write tokens from ``sent_tokens`` into ``blocks`` (a faulty
        Encode side that does not wait for this receiver's own message)."""
        state = self._rooms[room]
        state.sent_tokens = sent_tokens
        state.pending = Chunk(tuple(blocks), sent_tokens, allocated_tokens)

    def on_abort(self, room: Room) -> None:
        state = self._rooms.get(room)
        if state is None:
            return
        state.abort_queued = True
        if not self.async_abort:
            self.act_on_abort(room)

    def act_on_abort(self, room: Room) -> bool:
        """The sender processes a queued abort: it drops the pending chunk and acknowledges; False if none."""
        state = self._rooms.get(room)
        if state is None or not state.abort_queued or state.stopped:
            return False
        state.pending = None
        state.stopped = True
        return True

    def abort_acknowledged(self, room: Room) -> bool:
        state = self._rooms.get(room)
        return state is not None and state.stopped and not state.dead

    def writes_stopped(self, room: Room) -> bool:
        """What the receiver's end may take as evidence: a terminal status this sender published, or its
        acknowledgement of an abort. A misreported poll answer is no evidence."""
        state = self._rooms.get(room)
        return state is not None and (state.status in _TERMINAL or self.abort_acknowledged(room))

    def abort_queued(self, room: Room) -> bool:
        state = self._rooms.get(room)
        return state is not None and state.abort_queued and not state.stopped

    # ---- what the sender does --------------------------------------------------------------------

    def deliver(self, room: Room, blocks: int | None = None) -> bool:
        """Land the pending chunk (or the handshake) and publish the resulting status; False if none.

        With ``blocks``, only that many of the chunk's blocks land (the aux row among them) and nothing is
        published: the transfer is in flight, which is exactly when nobody may read those rows.
        """
        state = self._rooms[room]
        if state.handshake_pending:
            state.handshake_pending = False
            self.publish(room, KVPoll.WaitingForInput)
            return True
        chunk = state.pending
        if chunk is None or state.dead or state.status is KVPoll.Failed:
            return False
        source, b = state.source, self.buffers.block_size
        remaining = source.total_tokens - chunk.sent_tokens
        tokens = min(remaining, chunk.allocated_tokens)
        needed = -(-tokens // b)
        if needed > len(chunk.blocks):
            self._fail(state, f"insufficient dst blocks: {tokens} tokens, {len(chunk.blocks)} blocks")
            return True
        start = (chunk.sent_tokens // b) * b  # the original restarts at a block boundary (#2)
        landing = needed if blocks is None else min(blocks, needed)
        for i, block in enumerate(chunk.blocks[:landing]):
            lo = start + i * b
            hi = min(lo + b, start + tokens, source.total_tokens)
            source.write_tokens(lo, hi, self.buffers.block_views(block, hi - lo))
            self.writes.append((room, block))
        if chunk.with_aux:
            self.buffers.write_aux(
                chunk.blocks[0], source.total_tokens, source.mrope_delta, source.checksum, source.checksum_algorithm
            )
        if landing < needed:
            return True
        state.pending = None
        state.sent_tokens = chunk.sent_tokens + tokens
        self.publish(room, KVPoll.Transferring if tokens < remaining else KVPoll.Success)
        return True

    def kill(self, room: Room) -> None:
        """Die silently: no more writes, no more status messages (only a timeout can tell)."""
        self._rooms[room].dead = True

    def is_dead(self, room: Room) -> bool:
        return self._rooms[room].dead

    def fail(self, room: Room, reason: str = "sender failed") -> None:
        self._fail(self._rooms[room], reason)

    def publish(self, room: Room, status: KVPoll) -> None:
        """Apply a status message: up only, or down to Failed, which then holds.

        (The original's table took ``max`` even over Failed, so a late message could revive a failed
        room before the receiver latched it; Failed is absorbing here.)
        """
        state = self._rooms[room]
        if state.dead:
            return
        state.published.append(status)
        if state.status is not KVPoll.Failed:
            state.status = KVPoll.Failed if status is KVPoll.Failed else max(state.status, status)

    def published(self, room: Room) -> list[KVPoll]:
        """Every status message sent for ``room`` so far: the only ones that can arrive again, or late."""
        state = self._rooms.get(room)
        return [] if state is None else list(dict.fromkeys(state.published))

    # ---- helpers ---------------------------------------------------------------------------------

    def _record(
        self, room: Room, kind: Literal["init", "resume"], blocks: Sequence[int], sent: int, allocated: int
    ) -> _Room:
        message = Message(room, kind, tuple(blocks), sent, allocated)
        self.messages.append(message)
        state = self._rooms[room]
        state.messages.append(message)
        return state

    def _check_geometry(self, state: _Room, blocks: Sequence[int], allocated_tokens: int) -> bool:
        b = self.block_size
        if not blocks or allocated_tokens // len(blocks) != b:
            self._fail(state, f"block size mismatch: {allocated_tokens} tokens over {len(blocks)} blocks, B={b}")
            return False
        return True

    def _fail(self, state: _Room, reason: str) -> None:
        state.failure = reason
        state.pending = None
        state.status = KVPoll.Failed
        state.published.append(KVPoll.Failed)
