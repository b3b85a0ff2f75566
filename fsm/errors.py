"""Typed errors.

Two families, deliberately separate. A `ReceiverError` is about one request: the sender, the client or
the data went wrong, the request ends FAILED and everything else goes on. A `ContractError` means our
own discipline was broken (a read outside a window, a double free, a spec that does not match the
code); it is a bug, so it propagates instead of being turned into a failed request.
"""

from __future__ import annotations

from typing import ClassVar

Room = int


class ReceiverError(Exception):
    """A request-scoped failure: names the room and the cause, and fails that request only."""

    cause: ClassVar[str] = "receiver_error"

    def __init__(self, room: Room, detail: str) -> None:
        super().__init__(f"room {room}: {self.cause}: {detail}")
        self.room = room
        self.detail = detail


class SenderFailed(ReceiverError):
    """The sender (or any rank's view of it) reported Failed."""

    cause = "sender_failed"


class TransportFailed(ReceiverError):
    """The link to the sender raised while the controller used it (a dead peer, a closed socket)."""

    cause = "transport_failed"


class ProtocolViolation(ReceiverError):
    """A status that cannot follow what the receiver has seen or sent (premature, backwards, unknown)."""

    cause = "protocol_violation"


class CorruptAux(ReceiverError):
    """The aux row of A0[0] holds a total length, or names a checksum algorithm, that cannot be true."""

    cause = "corrupt_aux"


class IntegrityError(ReceiverError):
    """The assembled payload does not match the checksum the sender wrote into A0[0]'s aux row."""

    cause = "integrity"


class SizeMismatch(ReceiverError):
    """The lengths the sender reported and the allocation cannot agree."""

    cause = "size_mismatch"


class PoolTooSmall(ReceiverError):
    """The request needs more blocks than the whole pool has: waiting would be forever."""

    cause = "pool_too_small"


class TimedOut(ReceiverError):
    """The request stayed in one state past its deadline: a dead sender, or a pool that never frees."""

    cause = "timeout"


class Aborted(ReceiverError):
    """The client aborted the request."""

    cause = "aborted"


class RankDisagreement(ReceiverError):
    """The tensor-parallel ranks read different lengths or data for this request; all of them fail it."""

    cause = "rank_disagreement"


class ContractError(Exception):
    """Our own discipline was broken; never converted into a failed request."""


class ReadOutsideWindow(ContractError):
    """A buffer read that no transition of the spec grants (I1, I2)."""


class OwnershipError(ContractError):
    """A block freed twice, freed by a request that does not own it, or leaked (I5)."""


class SpecError(ContractError):
    """spec/receiver.toml is inconsistent, or disagrees with the code."""


class UnknownRoom(ContractError, KeyError):
    """The caller named a room the queue does not hold (never added, or already retired)."""

    def __init__(self, room: Room, what: str) -> None:
        super().__init__(f"room {room}: {what}")
        self.room = room

    def __str__(self) -> str:
        return str(self.args[0])


class ConfigError(ValueError):
    """A configuration that cannot work (a first allocation larger than the pool, ports of different block
    sizes, a deadline that is not positive): refused when the queue is built, naming the fields, instead
    of failing every request later."""


class DuplicateRoom(ContractError, ValueError):
    """The caller added a room the queue already holds."""


class RankDivergence(ContractError):
    """The ranks' queues are out of lockstep (different rooms polled, different allocator operations)."""
