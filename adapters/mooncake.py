"""The real transport, receiver side: Mooncake's transfer engine for the bytes, ZMQ for the messages.

Each rank registers its own pool with its own engine and tells the Encode side where the rows are (a
``hello``, as SGLang's bootstrap registration does). The Encode side writes every chunk straight into
those rows with ``batch_transfer_sync_write`` and publishes the resulting status over ZMQ; the receiver
only ever learns about a transfer from that status, exactly as with the in-process sender. One DEALER
socket per rank carries every room; ``MooncakeLink`` is one room's view of it, the TransportLink (and,
for a sender that reports progress, ProgressLink) the controller polls.

A status only goes up here, except to Failed, which then holds: late or repeated messages are harmless.
A dead sender sends nothing, so only the controller's deadlines notice it; a write that the engine
reports as failed (rc = -1) arrives as Failed with the sender's reason.
"""

from __future__ import annotations

import importlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from epd_receiver.fsm import KVPoll, Room

from .buffers import TorchBlockBuffers

PROTOCOL, METADATA, HOST = "tcp", "P2PHANDSHAKE", "127.0.0.1"


class MooncakeMissing(RuntimeError):
    """The transfer engine cannot be imported here (the package or its native libraries are missing)."""


def mooncake_missing() -> str | None:
    """Why the engine is unusable here, or None when it imports (the tests skip on the reason)."""
    try:
        _engine_class()
    except MooncakeMissing as missing:
        return str(missing)
    return None


def _engine_class() -> Any:
    # Mooncake logs every expected failure (a write out of range, a dead peer) at ERROR through glog.
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    os.environ.setdefault("GLOG_minloglevel", "3")
    try:
        return importlib.import_module("mooncake.engine").TransferEngine
    except ImportError as error:
        raise MooncakeMissing(
            "mooncake-transfer-engine-non-cuda is not importable "
            f"(pip install the [dist] extra; it needs Debian's libibverbs1): {error}"
        ) from error


class Engine:
    """One Mooncake transfer engine on loopback tcp, with peers found by P2P handshake (no metadata server)."""

    def __init__(self, host: str = HOST) -> None:
        self._engine = _engine_class()()
        rc = self._engine.initialize(host, METADATA, PROTOCOL, "")
        if rc != 0:
            raise RuntimeError(f"TransferEngine.initialize({host!r}, {METADATA}, {PROTOCOL}) returned {rc}")
        self.session = f"{host}:{self._engine.get_rpc_port()}"

    def register(self, tensors: Sequence[torch.Tensor]) -> None:
        """Pin tensors for remote access; a peer may only write inside registered memory."""
        for tensor in tensors:
            rc = self._engine.register_memory(tensor.data_ptr(), tensor.nbytes)
            if rc != 0:
                raise RuntimeError(f"register_memory of {tensor.nbytes} bytes returned {rc}")

    def unregister(self, tensors: Sequence[torch.Tensor]) -> None:
        for tensor in tensors:
            self._engine.unregister_memory(tensor.data_ptr())

    def write(self, session: str, sources: list[int], targets: list[int], lengths: list[int]) -> int:
        """One synchronous batch of writes into ``session``'s memory: 0 when all landed, -1 otherwise."""
        return int(self._engine.batch_transfer_sync_write(session, sources, targets, lengths))


# ---- the wire ---------------------------------------------------------------------------------------


def send(socket: zmq.Socket[bytes], message: dict[str, Any], identity: bytes | None = None) -> None:
    """One JSON message; never blocks (a peer that is gone just does not read it)."""
    frames = [json.dumps(message).encode()]
    socket.send_multipart(([identity] if identity is not None else []) + frames, flags=zmq.NOBLOCK)


def decode(frame: bytes) -> dict[str, Any]:
    message = json.loads(frame)
    if not isinstance(message, dict) or "op" not in message:
        raise ValueError(f"not a message: {frame[:80]!r}")
    return message


@dataclass(frozen=True, slots=True)
class Geometry:
    """What the sender must know of a pool to write into it; both sides derive B, H, K from it."""

    num_blocks: int
    block_size: int
    hidden_size: int
    deepstack: int

    @classmethod
    def of(cls, buffers: TorchBlockBuffers) -> Geometry:
        return cls(buffers.num_blocks, buffers.block_size, buffers.hidden_size, buffers.deepstack_layers)


# ---- the receiver's end -----------------------------------------------------------------------------


@dataclass(slots=True)
class _RoomView:
    """What this rank knows of one room: only what the sender's messages said."""

    status: int = int(KVPoll.Bootstrapping)
    landed: int = 0
    reason: str | None = None
    abort_sent: bool = False
    abort_acked: bool = False

    def apply(self, status: int, landed: int, reason: str | None) -> None:
        if self.status == int(KVPoll.Failed):
            return
        if status == int(KVPoll.Failed):
            self.status, self.reason = status, reason
            return
        self.status = max(self.status, status)
        self.landed = max(self.landed, landed)


class SenderUnreachable(RuntimeError):
    """The Encode side did not answer a hello or a call in time."""


class MooncakeReceiver:
    """One rank's end of the transport: its registered pool and its socket to the Encode side."""

    def __init__(
        self,
        engine: Engine,
        buffers: TorchBlockBuffers,
        endpoint: str,
        rank: int,
        *,
        seed: int,
        connect_timeout_s: float = 30.0,
    ) -> None:
        self.rank = rank
        self.seed = seed
        self._engine = engine
        self.buffers = buffers
        self._rooms: dict[Room, _RoomView] = {}
        self._replies: dict[str, dict[str, Any]] = {}
        self._context = zmq.Context.instance()
        self._socket: zmq.Socket[bytes] = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.IDENTITY, f"rank{rank}-{uuid.uuid4().hex[:12]}".encode())
        self._socket.connect(endpoint)
        engine.register(buffers.buffers())
        try:
            pointers, _, item_lens = buffers.get_buf_infos()
            geometry = Geometry.of(buffers)
            self.call(
                "hello",
                connect_timeout_s,
                session=engine.session,
                ptrs=pointers,
                item_lens=item_lens,
                geometry=[geometry.num_blocks, geometry.block_size, geometry.hidden_size, geometry.deepstack],
            )
        except BaseException:
            self.close()
            raise

    # ---- rooms -----------------------------------------------------------------------------------

    def link(
        self, room: Room, total_tokens: int, *, progress: bool = False, checksum: bool = False, fault: str | None = None
    ) -> MooncakeLink:
        """Route a request to the Encode side and return its link (a ProgressLink when it reports progress).

        The request carries what the Encode side would learn from the prompt itself (its length, the
        seed its content derives from); the receiver's controller learns T only from the aux row.
        """
        if room in self._rooms:
            raise ValueError(f"room {room} already has a link on rank {self.rank}")
        self._rooms[room] = _RoomView()
        self._send(
            {
                "op": "request",
                "room": room,
                "total_tokens": total_tokens,
                "seed": self.seed,
                "progress": progress,
                "checksum": checksum,
                "fault": fault,
            }
        )
        return ProgressMooncakeLink(self, room) if progress else MooncakeLink(self, room)

    def view(self, room: Room) -> _RoomView:
        self.pump()
        return self._rooms[room]

    def forget(self, room: Room) -> None:
        self._rooms.pop(room, None)

    # ---- messages --------------------------------------------------------------------------------

    def pump(self) -> int:
        """Apply every message that has arrived, without waiting; the number applied."""
        applied = 0
        while self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._apply(decode(self._socket.recv()))
            applied += 1
        return applied

    def wait(self, timeout_s: float) -> int:
        """Sleep until a message arrives or ``timeout_s`` passes; then apply what arrived."""
        if self._socket.poll(int(timeout_s * 1000)):
            return self.pump()
        return 0

    def call(self, op: str, timeout_s: float, **fields: Any) -> dict[str, Any]:
        """A request the Encode side answers with ``<op>_reply`` (hello, stats, bench)."""
        self._replies.pop(op, None)
        self._send({"op": op, **fields})
        deadline = time.monotonic() + timeout_s
        while op not in self._replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SenderUnreachable(f"rank {self.rank}: no answer to {op!r} within {timeout_s:g} s")
            self.wait(min(left, 0.1))
        return self._replies.pop(op)

    def _apply(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op.endswith("_reply"):
            self._replies[op.removesuffix("_reply")] = message
            return
        view = self._rooms.get(int(message["room"]))
        if view is None:
            return  # a room this rank has forgotten: a late message, harmless
        if op == "status":
            view.apply(int(message["status"]), int(message.get("landed", 0)), message.get("reason"))
        elif op == "abort_ack":
            view.abort_acked = True

    def _send(self, message: dict[str, Any]) -> None:
        send(self._socket, message | {"rank": self.rank})

    def close(self) -> None:
        """Unregister the pool and close the socket; the engine stays for the next pool."""
        self._engine.unregister(self.buffers.buffers())
        self._socket.close(linger=0)


class MooncakeLink:
    """The TransportLink of one room: polls read what the sender published; messages go out at once."""

    __slots__ = ("_receiver", "room")

    def __init__(self, receiver: MooncakeReceiver, room: Room) -> None:
        self._receiver = receiver
        self.room = room

    def poll(self) -> int:
        """The status the sender last published for the room (what this rank has heard of it)."""
        return self._receiver.view(self.room).status

    def init(self, blocks: Sequence[int], allocated_tokens: int) -> None:
        self._receiver._send(
            {
                "op": "init",
                "room": self.room,
                "blocks": list(blocks),
                "sent_tokens": 0,
                "allocated_tokens": allocated_tokens,
            }
        )

    def resume(self, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None:
        self._receiver._send(
            {
                "op": "resume",
                "room": self.room,
                "blocks": list(blocks),
                "sent_tokens": sent_tokens,
                "allocated_tokens": allocated_tokens,
            }
        )

    def abort(self) -> None:
        """Ask the sender to stop writing for this room; it acknowledges once it has."""
        view = self._receiver.view(self.room)
        if not view.abort_sent:
            view.abort_sent = True
            self._receiver._send({"op": "abort", "room": self.room})

    def abort_acknowledged(self) -> bool:
        """The sender answered our abort: it will not write for this room again. Each rank hears it at its
        own moment; the controller reduces it across ranks before it lifts a fence."""
        return self._receiver.view(self.room).abort_acked

    def failure_reason(self) -> str | None:
        return self._receiver.view(self.room).reason


class ProgressMooncakeLink(MooncakeLink):
    """A link whose sender also reports the tokens landed so far: remainders may come in rounds."""

    __slots__ = ()

    def landed_tokens(self) -> int:
        return self._receiver.view(self.room).landed
