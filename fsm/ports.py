"""The ports through which the pure core reaches the world; ``adapters/`` implements each of them.

Everything the controller learns arrives through a port call it makes at a time the spec allows, and
everything it does to the world leaves through one. That is what makes it fuzzable and embeddable.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol, TypeVar

from .errors import Room
from .states import State

PayloadT = TypeVar("PayloadT")


class ChecksumAlgorithm(IntEnum):
    """The hash a sender's checksum was made with, by its id in aux slot 2 (0 there: no checksum)."""

    CRC32 = 1  # zlib's, 32 bits
    XXH3_64 = 2  # xxHash's XXH3, 64 bits, seed 0: the default, several times faster than CRC32

    @classmethod
    def known(cls, value: int) -> bool:
        return value in cls._value2member_map_


@dataclass(frozen=True, slots=True)
class AuxRow:
    """The aux row of one block, returned by value so that a cached total can never alias the pool (#17)."""

    total_tokens: int
    mrope_delta: int
    checksum: int | None = None  # the sender's digest of the payload, when it wrote one (aux slots 3-4)
    # aux slot 2 as written: a ChecksumAlgorithm's id when a checksum follows, though possibly one unknown here
    checksum_algorithm: int = ChecksumAlgorithm.XXH3_64


class BlockBuffers(Protocol[PayloadT]):
    """The receive pool: rows of B tokens, written by the sender, read by the controller."""

    @property
    def block_size(self) -> int: ...

    def read_aux(self, block: int) -> AuxRow:
        """Copy the aux row of one block (only A0[0]'s is ever meaningful)."""
        ...

    def clear_checksum(self, block: int) -> None:
        """Make the aux row of one block carry no checksum until a sender writes one.

        The controller's only write to the pool, made on A0[0] before the init names the block: the pool is
        never cleared, and a sender that writes only T and the M-RoPE delta (every sender writes those for
        A0[0]; SGLang's writes nothing more) would otherwise leave an earlier request's checksum there.
        """
        ...

    def new_payload(self, total_tokens: int, mrope_delta: int, digest: ChecksumAlgorithm | None = None) -> PayloadT:
        """Allocate the output a whole payload is assembled into, once per request.

        ``digest`` names the algorithm ``checksum`` will be asked for once the payload is whole (None: it
        will not be): buffers may then hash each piece as they gather it, while it is in the cache.
        """
        ...

    def checksum(self, payload: PayloadT, algorithm: ChecksumAlgorithm) -> int:
        """The digest of an assembled payload with ``algorithm``, over the bytes the sender's checksum covers."""
        ...

    def gather(self, blocks: Sequence[int], tokens: int, into: PayloadT, at: int) -> None:
        """Copy ``tokens`` tokens held by ``blocks`` (in list order) into ``into[at:at+tokens]``.

        The blocks must hold exactly that many tokens, every block but the last full: a partial block's
        M-RoPE runs are packed by the count it was written with, so a shorter read would misplace them.
        """
        ...


class BlockAllocator(Protocol):
    """Owns the pool's blocks: all-or-nothing, FIFO, and it knows each block's owner."""

    @property
    def block_size(self) -> int: ...

    @property
    def num_blocks(self) -> int: ...

    def alloc(self, owner: Room, tokens: int) -> tuple[int, ...] | None:
        """``ceil(tokens / B)`` blocks for ``owner``, or None with no side effect."""
        ...

    def free(self, owner: Room, blocks: Sequence[int]) -> None:
        """Return blocks ``owner`` holds; raises OwnershipError on a double or foreign free."""
        ...

    def fence(self, owner: Room, blocks: Sequence[int]) -> None:
        """Take blocks ``owner`` holds out of its hands without freeing them: a sender may still write there.

        A block is free, owned or fenced, never two of them (I5); OwnershipError as for ``free``.
        """
        ...

    def unfence(self, owner: Room, blocks: Sequence[int]) -> None:
        """The sender has stopped: blocks fenced for ``owner`` return to the free list."""
        ...

    @property
    def free_count(self) -> int:
        """Blocks an allocation could take now."""
        ...


class TransportLink(Protocol):
    """One request's connection to its sender (spec/RECEIVER.md, "The link contract").

    Two questions are kept apart. ``poll()`` is the status as this side presents it, and a link may fold
    its own conclusions into it (SGLang's receiver reports Failed after a local abort). ``writes_stopped()``
    is evidence that the remote writer is done, and only that may return fenced blocks to the pool.
    Any method may raise: the controller then fails the request with TransportFailed on every rank and
    fences what it holds, since whether the sender stopped is unknown.
    """

    def poll(self) -> int:
        """This rank's view of the sender's status, a KVPoll value (not necessarily a valid one)."""
        ...

    def init(self, blocks: Sequence[int], allocated_tokens: int) -> None: ...

    def resume(self, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None: ...

    def abort(self) -> None:
        """The request is over on this side: the sender must not start another write for it."""
        ...

    def writes_stopped(self) -> bool:
        """Evidence that the sender writes no more into this room's blocks: a terminal status (Failed or
        Success) the remote side reported, or the remote side's acknowledgement of our abort.

        Never a conclusion this side reached (a local abort, a local deadline, a lost heartbeat); False
        while unknown. Once True it stays True.
        """
        ...

    # Optional, as SGLang's ``failure_exception()``: ``failure_reason() -> str | None`` says why the
    # sender reported Failed (a block-size mismatch, a transfer error); the typed error then carries it.


class ProgressLink(TransportLink, Protocol):
    """A link whose sender also reports how many tokens have landed so far (not in SGLang's wire
    protocol, which carries the status only). With it a resume may cover only part of the remainder."""

    def landed_tokens(self) -> int: ...


class RankGroup(Protocol):
    """The tensor-parallel ranks of one server, each running its own queue over its own pool.

    Every rank must take the same branch for every request, or their pools drift apart (#4, #16). These
    are the only collectives the controller makes; every rank makes them in the same order, because
    every rank sees the same reduced polls and the same spec.
    """

    @property
    def size(self) -> int: ...

    def min_reduce(self, rooms: Sequence[Room], values: Sequence[int]) -> list[int]:
        """The element-wise MIN of the values every rank passed, one collective per iteration.

        The queue passes several columns of one value per room (polls, deadline flags, landed counts,
        "sender done"), so ``values`` is a multiple of ``rooms`` long.

        Raises RankDivergence when the ranks poll different rooms, or the same rooms in another order.
        """
        ...

    def same(self, values: Sequence[int]) -> bool:
        """True on every rank when every rank passed the same values; False on every rank otherwise."""
        ...


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...


class SingleRank:
    """The rank group of a server without tensor parallelism: the local polls are the reduced polls."""

    @property
    def size(self) -> int:
        return 1

    def min_reduce(self, rooms: Sequence[Room], values: Sequence[int]) -> list[int]:
        return list(values)

    def same(self, values: Sequence[int]) -> bool:
        return True


class MonotonicClock:
    """The process's monotonic clock; tests and simulations inject a manual one instead."""

    def now(self) -> float:
        return time.monotonic()


class ReceiverMetrics(Protocol):
    """Where the controller reports what a serving team scrapes: stage latencies, outcomes, fences, pool use.

    Called only where something changed (a state change, a request's end, a fence set or lifted) and once
    per scheduler iteration for the gauges, never on the quiet poll that leaves a request where it was:
    a receive that spends most iterations waiting must cost nothing extra while it waits. Implementations
    must not raise; they run inside the controller's transitions.
    """

    def entered(self, state: State, left: State, seconds: float) -> None:
        """A request entered ``state`` after ``seconds`` in ``left``."""
        ...

    def ended(
        self, outcome: State, cause: str | None, failed_in: State | None, seconds: float, tokens: int, resumes: int
    ) -> None:
        """A request reached a terminal state, ``seconds`` after it arrived; ``cause`` names the error class of
        a failure (None on success) and ``failed_in`` the state it failed from; ``tokens`` landed in all."""
        ...

    def fenced(self, blocks: int) -> None:
        """A failed request fenced ``blocks`` blocks its sender might still write into."""
        ...

    def fence_lifted(self, blocks: int, seconds: float) -> None:
        """A fence of ``blocks`` blocks, set ``seconds`` ago, returned them to the pool."""
        ...

    def rank_disagreement(self, what: str) -> None:
        """The tensor-parallel ranks disagreed on ``what`` (a fixed word: "aux", "payload", "allocator")."""
        ...

    def iteration(self, requests: Mapping[State, int], free: int, owned: int, fenced: int) -> None:
        """The end of a scheduler iteration: requests per state and the pool's blocks by standing."""
        ...


class NoMetrics:
    """The default: reports nothing. The queue recognises it and skips counting the gauges it would drop."""

    def entered(self, state: State, left: State, seconds: float) -> None:
        pass

    def ended(
        self, outcome: State, cause: str | None, failed_in: State | None, seconds: float, tokens: int, resumes: int
    ) -> None:
        pass

    def fenced(self, blocks: int) -> None:
        pass

    def fence_lifted(self, blocks: int, seconds: float) -> None:
        pass

    def rank_disagreement(self, what: str) -> None:
        pass

    def iteration(self, requests: Mapping[State, int], free: int, owned: int, fenced: int) -> None:
        pass
