"""Pure-Python fakes of the receiver's ports, for driving the controller (fsm.ReceiverQueue) with no torch.

Three tiny ports (buffers, allocator, link) that record what the controller asks of them, the link variants
that stand for the ways a real transport misbehaves, a clock the test moves, and a scripted second rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from epd_receiver.fsm import (
    AuxRow,
    ChecksumAlgorithm,
    KVPoll,
    OwnershipError,
    Room,
    SenderFailed,
)

HOG: Room = -1  # the owner the tests give every free block to, so that no allocation can succeed


# ---- fake ports -------------------------------------------------------------------------------------


@dataclass
class FakePayload:
    """The assembled output: for each token, the pool block it was gathered from (None until gathered)."""

    total_tokens: int
    mrope_delta: int
    sources: list[int | None]


class FakeBuffers:
    """The BlockBuffers port: aux rows from a dict the test controls; every read is recorded."""

    def __init__(self, block_size: int) -> None:
        self._block_size = block_size
        self.aux: dict[int, AuxRow] = {}
        self.aux_reads: list[int] = []
        self.gathers: list[tuple[tuple[int, ...], int, int]] = []
        self.payloads: list[FakePayload] = []
        self.digests: list[ChecksumAlgorithm] = []  # one entry per payload digest computed, by algorithm
        self.digests_announced: list[ChecksumAlgorithm | None] = []  # per payload: the digest it will need

    @property
    def block_size(self) -> int:
        return self._block_size

    def read_aux(self, block: int) -> AuxRow:
        self.aux_reads.append(block)
        return self.aux.get(block, AuxRow(0, 0))  # a never-written row reads as zeros, as a fresh pool does

    def clear_checksum(self, block: int) -> None:
        row = self.aux.get(block)
        if row is not None:
            self.aux[block] = AuxRow(row.total_tokens, row.mrope_delta)

    def new_payload(self, total_tokens: int, mrope_delta: int, digest: ChecksumAlgorithm | None = None) -> FakePayload:
        payload = FakePayload(total_tokens, mrope_delta, [None] * total_tokens)
        self.payloads.append(payload)
        self.digests_announced.append(digest)
        return payload

    def checksum(self, payload: FakePayload, algorithm: ChecksumAlgorithm) -> int:
        self.digests.append(algorithm)
        width = 0xFFFFFFFF if algorithm is ChecksumAlgorithm.CRC32 else 0xFFFFFFFFFFFFFFFF
        return hash((algorithm, *payload.sources)) & width

    def gather(self, blocks: Sequence[int], tokens: int, into: FakePayload, at: int) -> None:
        self.gathers.append((tuple(blocks), tokens, at))
        assert tokens <= len(blocks) * self._block_size, "more tokens than the blocks hold"
        assert at >= 0 and at + tokens <= into.total_tokens, "gather outside the payload"
        for i in range(tokens):
            into.sources[at + i] = blocks[i // self._block_size]


class FakeAllocator:
    """The BlockAllocator port: FIFO free list, all-or-nothing, an owner per block, loud on a bad free."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self._num_blocks = num_blocks
        self._block_size = block_size
        self.free_list: list[int] = list(range(num_blocks))
        self.owner: dict[int, Room] = {}
        self.fenced: dict[int, Room] = {}
        self.allocs: list[tuple[Room, tuple[int, ...]]] = []
        self.frees: list[tuple[Room, tuple[int, ...]]] = []

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def free_count(self) -> int:
        return len(self.free_list)

    def alloc(self, owner: Room, tokens: int) -> tuple[int, ...] | None:
        needed = -(-tokens // self._block_size)
        if needed > len(self.free_list):
            return None
        blocks = tuple(self.free_list[:needed])
        del self.free_list[:needed]
        for block in blocks:
            self.owner[block] = owner
        self.allocs.append((owner, blocks))
        return blocks

    def free(self, owner: Room, blocks: Sequence[int]) -> None:
        self._take(self.owner, owner, blocks)
        self.free_list.extend(blocks)
        self.frees.append((owner, tuple(blocks)))

    def fence(self, owner: Room, blocks: Sequence[int]) -> None:
        self._take(self.owner, owner, blocks)
        self.fenced.update(dict.fromkeys(blocks, owner))

    def unfence(self, owner: Room, blocks: Sequence[int]) -> None:
        self._take(self.fenced, owner, blocks)
        self.free_list.extend(blocks)
        self.frees.append((owner, tuple(blocks)))

    @staticmethod
    def _take(holders: dict[int, Room], owner: Room, blocks: Sequence[int]) -> None:
        if len(set(blocks)) != len(blocks) or any(holders.get(b) != owner for b in blocks):
            raise OwnershipError(f"room {owner} gives back {list(blocks)}; holders: {[holders.get(b) for b in blocks]}")
        for block in blocks:
            del holders[block]

    def fenced_by(self, owner: Room) -> tuple[int, ...]:
        return tuple(sorted(b for b, o in self.fenced.items() if o == owner))

    def owned_by(self, owner: Room) -> tuple[int, ...]:
        return tuple(sorted(b for b, o in self.owner.items() if o == owner))

    def blocks_allocated_to(self, owner: Room) -> list[int]:
        return sorted(b for o, blocks in self.allocs if o == owner for b in blocks)

    def blocks_freed_by(self, owner: Room) -> list[int]:
        return sorted(b for o, blocks in self.frees if o == owner for b in blocks)

    def hog(self) -> None:
        """Give every free block to an outside owner: the next allocation pass can grant nothing."""
        assert self.alloc(HOG, len(self.free_list) * self._block_size) is not None


class FakeLink:
    """The TransportLink port: polls the value the test sets; records what the receiver sent."""

    def __init__(self, status: int = KVPoll.Bootstrapping) -> None:
        self.status = int(status)
        self.inits: list[tuple[tuple[int, ...], int]] = []
        self.resumes: list[tuple[tuple[int, ...], int, int]] = []
        self.aborts = 0
        self.acknowledged = False

    def poll(self) -> int:
        return self.status

    def init(self, blocks: Sequence[int], allocated_tokens: int) -> None:
        self.inits.append((tuple(blocks), allocated_tokens))

    def resume(self, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None:
        self.resumes.append((tuple(blocks), sent_tokens, allocated_tokens))

    def abort(self) -> None:
        self.aborts += 1

    def writes_stopped(self) -> bool:
        """The status the test sets stands for what the remote side reported."""
        return self.acknowledged or self.status in (KVPoll.Failed, KVPoll.Success)

    def sent(self) -> tuple[int, int, int]:
        return len(self.inits), len(self.resumes), self.aborts


class RaisingLink(FakeLink):
    """A link whose init or resume reports a typed failure, as a transport that lost its peer would."""

    def __init__(self, fail_on: str, room: Room) -> None:
        super().__init__(KVPoll.WaitingForInput)
        self.fail_on = fail_on
        self.room = room

    def init(self, blocks: Sequence[int], allocated_tokens: int) -> None:
        super().init(blocks, allocated_tokens)
        if self.fail_on == "init":
            raise SenderFailed(self.room, "init could not be sent")

    def resume(self, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None:
        super().resume(blocks, sent_tokens, allocated_tokens)
        if self.fail_on == "resume":
            raise SenderFailed(self.room, "resume could not be sent")


class BrokenLink(FakeLink):
    """A link whose socket died: the operation named raises a plain ConnectionError."""

    def __init__(self, broken: str) -> None:
        super().__init__(KVPoll.WaitingForInput)
        self.broken = broken

    def poll(self) -> int:
        if self.broken == "poll" and self.inits:
            raise ConnectionError("peer reset")
        return super().poll()

    def init(self, blocks: Sequence[int], allocated_tokens: int) -> None:
        super().init(blocks, allocated_tokens)
        if self.broken == "init":
            raise ConnectionError("peer reset")

    def resume(self, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None:
        super().resume(blocks, sent_tokens, allocated_tokens)
        if self.broken == "resume":
            raise ConnectionError("peer reset")


class ConcludingLink(FakeLink):
    """A link that folds its own conclusions into poll(), as SGLang's receiver does (ZhengWG/sglang
    cca20b0, python/sglang/srt/disaggregation/mooncake/conn_multimodal.py): its abort() records Failed as
    its own conclusion and sends the Encode side nothing (:1224-1230), and poll() latches the first Failed
    or Success it reads, returning that conclusion ever after (:1197-1205). ``status`` is what the remote
    side reported; only that is evidence. The kit's ``LocallyConcludingLink`` is the same behaviour over
    the in-process sender."""

    def __init__(self, status: int = KVPoll.WaitingForInput) -> None:
        super().__init__(status)
        self.concluded: int | None = None

    def poll(self) -> int:
        if self.concluded is None and self.status in (KVPoll.Failed, KVPoll.Success):
            self.concluded = self.status
        return self.status if self.concluded is None else self.concluded

    def abort(self) -> None:
        super().abort()
        self.concluded = int(KVPoll.Failed)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


class RecordingMetrics:
    """The ReceiverMetrics port: records every call, by method name with its arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for called, args in self.calls if called == name]

    def entered(self, *args: Any) -> None:
        self.calls.append(("entered", args))

    def ended(self, *args: Any) -> None:
        self.calls.append(("ended", args))

    def fenced(self, *args: Any) -> None:
        self.calls.append(("fenced", args))

    def fence_lifted(self, *args: Any) -> None:
        self.calls.append(("fence_lifted", args))

    def rank_disagreement(self, *args: Any) -> None:
        self.calls.append(("rank_disagreement", args))

    def iteration(self, requests: Any, *args: Any) -> None:
        self.calls.append(("iteration", (dict(requests), *args)))


class ProgressLink(FakeLink):
    """A link whose sender also reports the tokens landed so far."""

    def __init__(self, status: int = KVPoll.WaitingForInput) -> None:
        super().__init__(status)
        self.landed = 0

    def landed_tokens(self) -> int:
        return self.landed


class ExplainingLink(FakeLink):
    """A link that can say why its sender failed, as SGLang's receiver does through failure_exception(),
    which raises with the manager's failure record for the room (conn_multimodal.py:1211-1222)."""

    def failure_reason(self) -> str | None:
        return "transfer engine returned -1" if self.status == KVPoll.Failed else None


class PeerRank:
    """A RankGroup of two whose other rank is scripted: its polls, deadline flags and answers to ``same``."""

    size = 2

    def __init__(self) -> None:
        self.peer_polls: dict[Room, int] = {}
        self.peer_late: set[Room] = set()  # rooms whose deadline has passed on the other rank's clock
        self.peer_early: set[Room] = set()  # rooms whose deadline has not passed on the other rank's clock
        self.peer_writing: set[Room] = set()  # rooms whose sender has not stopped on the other rank
        self.peer_disagrees = False
        self.calls: list[str] = []
        self.sent: list[list[int]] = []  # what this rank contributed to each reduce

    def min_reduce(self, rooms: Sequence[Room], values: Sequence[int]) -> list[int]:
        """The queue's columns, each one value per room: poll, in time, past, landed, sender done."""
        self.calls.append("min_reduce")
        self.sent.append(list(values))
        n = len(rooms)
        peer = list(values)
        for i, room in enumerate(rooms):
            peer[i] = self.peer_polls.get(room, values[i])
            if room in self.peer_late:
                peer[n + i], peer[2 * n + i] = 0, 1
            if room in self.peer_early:
                peer[n + i], peer[2 * n + i] = 1, 0
            if room in self.peer_writing:
                peer[4 * n + i] = 0
        return [min(a, b) for a, b in zip(values, peer, strict=True)]

    def same(self, values: Sequence[int]) -> bool:
        self.calls.append("same")
        return not self.peer_disagrees
