"""The status values the sender publishes and the receiver polls (SGLang's ``KVPoll``)."""

from __future__ import annotations

from enum import IntEnum


class KVPoll(IntEnum):
    """Ordered so that a MIN over tensor-parallel ranks yields the least advanced view; Failed dominates."""

    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4
