"""The controller's ``TransportLink`` over an SGLang embedding receiver, and what counts there as evidence.

The fork's Mooncake receiver folds its own conclusions into ``poll()``: after ``abort()`` it reports Failed
although nothing was sent to the Encode side, and once it has returned Failed or Success it keeps returning
it. So ``poll()`` can never tell whether the sender still writes into our blocks. What the Encode side
itself said lives in the receiver's manager, in its per-room status table (``request_status``), which the
manager's listening thread updates from the Encode side's messages. That table is the only source of
evidence this link trusts, and it is read with the following rules:

- **Success** is evidence: only a message from the Encode side ever sets it, and the Encode side sends it
  after its last write for the room has completed.
- **Failed** is evidence only when the manager's failure record for the room is the one its listening
  thread writes when the Encode side reports Failed. The same table is also set to Failed on this side
  alone, by the heartbeat checker when a peer stops answering (the peer may well be alive and writing)
  and by the receiver's constructor when bootstrapping fails; and ``abort()`` overwrites the record. A
  record naming anything else, or no record, is not evidence: the fence then waits for a later remote
  status or the drain deadline, which is slower but never unsafe.
- **An absent entry**, or any other status, is not evidence. The receiver's ``failure_exception()`` pops
  the entry, so the link reads the table on every call it makes (poll, failure reason, writes_stopped)
  and latches the first evidence it sees. A later message from the Encode side creates the entry again.

The fork's own queue calls ``failure_exception()`` on every failed request as it reports it, which pops the
room's status and its failure record. That is too early while the request still fences blocks: the status
the Encode side sends next is the evidence the fence waits for. So the link pops nothing itself except
through ``failure_reason()``, and ``forget()``, called once the controller has retired a failed request,
clears the room's state the fork's way. A delivered request's Success entry stays, as in the fork, whose
queue never clears a successful room.

A warm-up request's stand-in receiver writes nothing, so its link has stopped from the start. Any other
receiver may answer ``writes_stopped()`` itself; one that offers neither that nor a manager never yields
evidence, and its fences end only by the drain deadline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from epd_receiver.fsm import KVPoll

__all__ = ["REMOTE_FAILURE_RECORD", "EmbeddingReceiver", "LinkFactory", "ReceiverLink", "remote_evidence"]

# The start of the failure record the fork's Language-side listening thread writes when the Encode side
# reports Failed (mooncake/conn_multimodal.py:634-639). Should the fork reword it, no Failed counts as
# evidence any more and fences end by the drain deadline: the safe direction.
REMOTE_FAILURE_RECORD = "Failed to get embedding data from embedding instance"


class EmbeddingReceiver(Protocol):
    """The Language-side receiver interface of SGLang's embedding transfer (Mooncake or fake)."""

    def poll(self) -> int: ...

    def init(self, embedding_indices: list[int] | None = None, allocated_tokens: int | None = None) -> None: ...

    def resume_transfer(self, embedding_indices: list[int], sent_tokens: int, allocated_tokens: int) -> None: ...

    def failure_exception(self) -> BaseException | None:
        """SGLang's raises the transfer error (after clearing the room's state); either way it explains Failed."""
        ...


def remote_evidence(manager: Any, room: int) -> bool:
    """What the manager's table says the Encode side reported for ``room``: True when it writes no more."""
    table = getattr(manager, "request_status", None)
    if table is None:
        return False
    status = table.get(room)
    if status is None:
        return False
    if int(status) == KVPoll.Success:
        return True
    if int(status) != KVPoll.Failed:
        return False
    records = getattr(manager, "failure_records", None) or {}
    lock = getattr(manager, "failure_lock", None)
    with lock if lock is not None else contextlib.nullcontext():
        record = records.get(room)
    return isinstance(record, str) and record.startswith(REMOTE_FAILURE_RECORD)


class ReceiverLink:
    """The controller's ``TransportLink`` over an SGLang receiver: same calls, keyword names as SGLang's."""

    __slots__ = ("_manager", "_room", "_stopped", "receiver")

    def __init__(self, receiver: Any, *, room: int | None = None, writes_nothing: bool = False) -> None:
        self.receiver = receiver
        self._manager = getattr(receiver, "embedding_mgr", None)
        self._room = getattr(receiver, "bootstrap_room", None) if room is None else room
        self._stopped = writes_nothing

    def poll(self) -> int:
        try:
            return int(self.receiver.poll())
        finally:
            self._observe()

    def init(self, blocks: Sequence[int], allocated_tokens: int) -> None:
        self.receiver.init(embedding_indices=list(blocks), allocated_tokens=allocated_tokens)

    def resume(self, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None:
        self.receiver.resume_transfer(
            embedding_indices=list(blocks), sent_tokens=sent_tokens, allocated_tokens=allocated_tokens
        )

    def abort(self) -> None:
        abort = getattr(self.receiver, "abort", None)  # SGLang's fake (warm-up) receiver has none
        if abort is not None:
            abort()

    def writes_stopped(self) -> bool:
        """Evidence from the Encode side that it writes no more for this room (module docstring); latched."""
        self._observe()
        return self._stopped

    def forget(self) -> None:
        """The failed request is retired (no fence left): pop the room's status and failure record, as the
        fork's queue does through ``failure_exception()`` for a failed request (whatever that raises)."""
        explain = getattr(self.receiver, "failure_exception", None)
        if explain is not None:
            with contextlib.suppress(Exception):
                explain()

    def failure_reason(self) -> str | None:
        """SGLang's ``failure_exception()`` raises the error rather than returning it; both are accepted.

        It also pops the room's status entry, so the table is read first, while the evidence is there.
        """
        self._observe()
        try:
            error = self.receiver.failure_exception()
        except Exception as raised:
            return str(raised)
        return None if error is None else str(error)

    def _observe(self) -> None:
        if self._stopped:
            return
        own = getattr(self.receiver, "writes_stopped", None)
        if own is not None:
            self._stopped = bool(own())
        elif self._manager is not None and self._room is not None:
            self._stopped = remote_evidence(self._manager, self._room)


LinkFactory = Callable[..., Any]  # (receiver, *, room, writes_nothing) -> TransportLink
