"""The pure core of the receiver: no torch, no sockets, no threads; the world is reached through ports."""

from .config import ReceiverConfig
from .errors import (
    Aborted,
    ConfigError,
    ContractError,
    CorruptAux,
    DuplicateRoom,
    IntegrityError,
    OwnershipError,
    PoolTooSmall,
    ProtocolViolation,
    RankDisagreement,
    RankDivergence,
    ReadOutsideWindow,
    ReceiverError,
    Room,
    SenderFailed,
    SizeMismatch,
    SpecError,
    TimedOut,
    TransportFailed,
    UnknownRoom,
)
from .kvpoll import LINK_ERROR, UNKNOWN_STATUS, KVPoll
from .ports import AuxRow, BlockAllocator, BlockBuffers, Clock, MonotonicClock, RankGroup, SingleRank, TransportLink
from .queue import ReceiverQueue
from .request import ReceiverRequest
from .spec import ReceiverSpec, load_spec
from .states import State

__all__ = [
    "LINK_ERROR",
    "UNKNOWN_STATUS",
    "Aborted",
    "AuxRow",
    "BlockAllocator",
    "BlockBuffers",
    "Clock",
    "ConfigError",
    "ContractError",
    "CorruptAux",
    "DuplicateRoom",
    "IntegrityError",
    "KVPoll",
    "MonotonicClock",
    "OwnershipError",
    "PoolTooSmall",
    "ProtocolViolation",
    "RankDisagreement",
    "RankDivergence",
    "RankGroup",
    "ReadOutsideWindow",
    "ReceiverConfig",
    "ReceiverError",
    "ReceiverQueue",
    "ReceiverRequest",
    "ReceiverSpec",
    "Room",
    "SenderFailed",
    "SingleRank",
    "SizeMismatch",
    "SpecError",
    "State",
    "TimedOut",
    "TransportFailed",
    "TransportLink",
    "UnknownRoom",
    "load_spec",
]
