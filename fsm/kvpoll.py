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


# Not a status: the value a rank contributes for a request whose link raised (in poll, init or resume). It
# sits below every KVPoll value and below any 32-bit value a link could return (a garbled status stays a
# garbled status), so the MIN reduce hands it to every rank and all of them fail the request together; the
# spec's ``link_error`` entries say what it does in each state.
LINK_ERROR = -(1 << 32)
# Not a status either: what a rank contributes for a value outside KVPoll. Below Failed, so that garbage
# on one rank reaches every rank (a value above Success would vanish under MIN) and all fail together.
UNKNOWN_STATUS = LINK_ERROR + 1
STATUSES = frozenset(int(value) for value in KVPoll)
