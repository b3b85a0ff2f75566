"""The Encode side's half of the fork's wire, as a plain object: who registered, which rooms wait, what to write.

No socket, engine or tensor here, so that every decision can be fed arbitrary frames in a test. The
Encode process (``server``) hands it each frame its PULL socket receives, asks it which room to
write next and how, reports what landed, and sends the frames it leaves in ``outbox``.

It behaves as the fork's Encode manager does (ZhengWG/sglang at cca20b0, ``python/sglang/srt/
disaggregation/mooncake/conn_multimodal.py``, ``conn:LINE`` below): a registration records a Language
rank's pointers by its engine session (``conn:512-521``); a room starts once ``required_dst_info_num``
Language ranks have sent their init (``conn:610-626``); a resume is written only when every one of them
has sent its own (``conn:526-609``); each rank's chunk follows ``send_embedding``'s arithmetic
(``conn:237-367``: tokens = min(T - sent, allocated), source from block sent // B, the aux row only
with block 0 of the first chunk), and the status goes to every rank once all are written
(``conn:473-485``). A failed write ends the room: the fork stops there too but tells only the rank
it failed for (``conn:441-471``); this side tells every rank, so that each has evidence of the stop.

Where the fork's thread would die (a frame of a shape it does not expect, an init from a session that
never registered, a block size it cannot divide) this one drops the frame with a counted cause, or
fails that room alone. Peers that announced our extension also get a hello, landed counts, failure
reasons, and an acknowledgement when they abort.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from epd_receiver.adapters.ports.mooncake import wire

KV_BOOTSTRAPPING, KV_WAITING = 1, 2
FAIL_ON_RESUME, TRANSFER_ERROR_ON_RESUME = "fail_on_resume", "transfer_error_on_resume"
_ENDED_KEPT = 1 << 16  # rooms remembered after their end, so that their late frames count as stale

Outgoing = tuple[str, list[bytes]]  # (host:port of a Language rank's PULL socket, frames)


@dataclass(frozen=True, slots=True)
class RoomPlan:
    """What the Encode side's own scheduler knows of a request (control plane, not the fork's wire)."""

    room: int
    total_tokens: int
    seed: int
    checksum: bool = False
    fault: str | None = None  # FAIL_ON_RESUME, TRANSFER_ERROR_ON_RESUME: injected by tests


@dataclass(slots=True)
class Peer:
    """A registered Language rank."""

    endpoint: str
    pointers: tuple[int, ...]
    extended: bool


@dataclass(slots=True)
class Target:
    """One Language rank's side of one room (the fork's TransferEmbeddingInfo, ``conn:61-76``)."""

    session: str
    endpoint: str  # where its statuses go: the ip and port its init named
    blocks: tuple[int, ...]
    allocated_tokens: int
    sent_tokens: int = 0
    resume_ready: bool = False


@dataclass(slots=True)
class RoomState:
    required: int
    targets: dict[str, Target] = field(default_factory=dict)
    status: int = KV_BOOTSTRAPPING
    awaiting_resume: bool = False


@dataclass(frozen=True, slots=True)
class Write:
    """One Language rank's share of a chunk: source tokens [start, start + tokens) into its blocks."""

    session: str
    pointers: tuple[int, ...]
    start: int
    tokens: int
    pairs: tuple[tuple[int, int, int], ...]  # (staged row, destination block, tokens it holds)
    with_aux: bool
    partial: bool


def same_rows(writes: Sequence[Write]) -> list[list[Write]]:
    """Consecutive writes of the same source rows, grouped: each group is staged once and written to all its
    targets at once. Ranks in lockstep ask for the same tokens, so a chunk is one group."""
    groups: list[list[Write]] = []
    for write in writes:
        key = (write.start, write.tokens, write.with_aux)
        if groups and (groups[-1][0].start, groups[-1][0].tokens, groups[-1][0].with_aux) == key:
            groups[-1].append(write)
        else:
            groups.append([write])
    return groups


class EncodeDesk:
    """The Encode side's rooms and peers; ``receive`` is total over any frames and counts what it drops."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint  # our rank_ip:rank_port, as registered with the bootstrap server
        self.block_size = 0
        self.buffers = 0
        self.peers: dict[str, Peer] = {}
        self.rooms: dict[int, RoomState] = {}
        self.plans: dict[int, RoomPlan] = {}
        self.ended: OrderedDict[int, None] = OrderedDict()
        self.ready: deque[int] = deque()
        self.outbox: list[Outgoing] = []
        self.drops = wire.DropLog("Encode")
        self.dropped = self.drops.counts

    def begin(self, block_size: int, buffers: int, plans: Iterable[RoomPlan]) -> None:
        """A new workload: the pool geometry both sides share, and the requests this side will serve."""
        self.block_size, self.buffers = block_size, buffers
        self.rooms.clear()
        self.ended.clear()
        self.ready.clear()
        self.plans = {plan.room: plan for plan in plans}

    # ---- frames in -------------------------------------------------------------------------------

    def receive(self, frames: list[bytes], peer: str) -> None:
        message = wire.decode_to_encode(frames)
        if isinstance(message, wire.Drop):
            self.drops.drop(message.cause, peer, message.detail)
        elif isinstance(message, wire.Registration):
            self._register(message)
        elif isinstance(message, wire.AbortRequest):
            self._abort(message, f"{peer} ({message.session})")
        elif message.is_resume:
            self._resume(message, f"{peer} ({message.session})")
        else:
            self._init(message, f"{peer} ({message.session})")

    def _register(self, message: wire.Registration) -> None:
        endpoint = f"{message.ip}:{message.port}"
        self.peers[message.session] = Peer(endpoint, message.pointers, bool(message.features))
        if message.features:
            self.outbox.append((endpoint, wire.encode_hello(wire.Hello(self.endpoint))))

    def _init(self, message: wire.TransferRequest, peer: str) -> None:
        where = f"{peer}, room {message.room}"
        if message.session not in self.peers:
            return self.drops.drop(wire.UNKNOWN_PEER, where, "an init from a session that never registered")
        if message.room in self.ended:
            return self.drops.drop(wire.STALE, where, "an init for a room that has ended")
        room = self.rooms.setdefault(message.room, RoomState(message.required_dst_info_num))
        if message.session in room.targets:
            return self.drops.drop(wire.DUPLICATE, where, "a second init from the same session")
        endpoint = f"{message.ip}:{message.port}"
        room.targets[message.session] = Target(message.session, endpoint, message.blocks, message.allocated_tokens)
        if len(room.targets) >= room.required and message.room in self.plans:
            room.status = KV_WAITING
            self.ready.append(message.room)

    def _resume(self, message: wire.TransferRequest, peer: str) -> None:
        where = f"{peer}, room {message.room}"
        room = self.rooms.get(message.room)
        target = None if room is None else room.targets.get(message.session)
        if room is None or target is None:
            cause = wire.STALE if message.room in self.ended else wire.UNKNOWN_ROOM
            return self.drops.drop(cause, where, "a resume for a room this session has no transfer in")
        if target.resume_ready:
            return self.drops.drop(wire.DUPLICATE, where, "a second resume for the same round")
        if not room.awaiting_resume:
            return self.drops.drop(wire.STALE, where, "a resume while no chunk waits for one")
        assert message.sent_tokens is not None
        target.blocks, target.allocated_tokens = message.blocks, message.allocated_tokens
        target.sent_tokens, target.resume_ready = message.sent_tokens, True
        if all(t.resume_ready for t in room.targets.values()):
            room.awaiting_resume = False
            for each in room.targets.values():
                each.resume_ready = False
            if self.plans[message.room].fault == FAIL_ON_RESUME:
                return self.fail(message.room, "the encoder failed while resuming (injected)")
            self.ready.append(message.room)

    def _abort(self, message: wire.AbortRequest, peer: str) -> None:
        sender = self.peers.get(message.session)
        if sender is None:
            return self.drops.drop(wire.UNKNOWN_PEER, peer, f"an abort of room {message.room}: no one to answer")
        if not sender.extended:
            return self.drops.drop(wire.UNANNOUNCED, peer, "an abort from a peer that announced no extension")
        room = self.rooms.get(message.room)
        if room is not None:
            others = {s: t for s, t in room.targets.items() if s != message.session}
            self._end(message.room, others, wire.KV_FAILED, "aborted by another Language rank")
        else:
            self._remember_end(message.room)
        self.outbox.append((sender.endpoint, wire.encode_abort_ack(wire.AbortAck(message.room))))

    # ---- the writer's questions and reports ------------------------------------------------------

    def next_room(self) -> int | None:
        """The next room with a chunk to write (one that ended while queued is skipped)."""
        while self.ready:
            room = self.ready.popleft()
            if room in self.rooms:
                return room
        return None

    def writes(self, room: int) -> list[Write] | str:
        """Every target's share of the room's next chunk, or why the room must fail instead."""
        plan, state, b = self.plans[room], self.rooms[room], self.block_size
        writes = []
        for session, target in state.targets.items():
            peer = self.peers[session]
            n = len(target.blocks)
            if n == 0 or target.allocated_tokens // n != b:
                return f"block size mismatch: {target.allocated_tokens} tokens over {n} blocks, B={b}"
            if len(peer.pointers) != self.buffers:
                return f"the Language pool has {len(peer.pointers)} buffers, this side writes {self.buffers}"
            remaining = plan.total_tokens - target.sent_tokens
            if remaining <= 0:  # the fork would write nothing and report Success; nothing asked for that
                return f"a resume past the end: {target.sent_tokens} of {plan.total_tokens} tokens sent"
            tokens = min(remaining, target.allocated_tokens)
            needed = -(-tokens // b)
            if needed > n:
                return f"insufficient dst blocks: {tokens} tokens, {n} blocks"
            pairs = tuple((i, block, min(b, tokens - i * b)) for i, block in enumerate(target.blocks[:needed]))
            start = target.sent_tokens // b * b
            writes.append(
                Write(session, peer.pointers, start, tokens, pairs, target.sent_tokens == 0, tokens < remaining)
            )
        return writes

    def landed(self, room: int, session: str, tokens: int) -> None:
        self.rooms[room].targets[session].sent_tokens += tokens

    def finish_chunk(self, room: int, partial: bool) -> None:
        """Every target is written: Transferring to all and wait for their resumes, or Success and end."""
        state = self.rooms[room]
        if not partial:
            return self._end(room, state.targets, wire.KV_SUCCESS, None)
        state.status, state.awaiting_resume = wire.KV_TRANSFERRING, True
        for target in state.targets.values():
            self._report(room, target, wire.KV_TRANSFERRING, None)

    def fail(self, room: int, reason: str) -> None:
        self._end(room, self.rooms[room].targets, wire.KV_FAILED, reason)

    # ---- frames out ------------------------------------------------------------------------------

    def _end(self, room: int, targets: dict[str, Target], status: int, reason: str | None) -> None:
        for target in targets.values():
            self._report(room, target, status, reason)
        del self.rooms[room]
        self._remember_end(room)

    def _remember_end(self, room: int) -> None:
        self.ended[room] = None
        while len(self.ended) > _ENDED_KEPT:
            self.ended.popitem(last=False)

    def _report(self, room: int, target: Target, status: int, reason: str | None) -> None:
        peer = self.peers.get(target.session)
        if peer is not None and peer.extended:
            report = wire.StatusReport(room, status, target.sent_tokens, reason)
        else:
            report = wire.StatusReport(room, status)  # the fork's Language thread unpacks exactly two frames
        self.outbox.append((target.endpoint, wire.encode_status(report)))
