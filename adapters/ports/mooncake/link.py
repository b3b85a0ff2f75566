"""The real transport, receiver side: Mooncake's transfer engine for the bytes, the SGLang fork's wire for the rest.

Each rank registers its own pool with its own engine, finds its Encode rank through the bootstrap server
and registers the pool's pointers with it (``wire``: the fork's frames, and our extension appended
where a fork peer ignores it). The Encode side writes every chunk straight into the rows and reports a
status to this rank's PULL socket; the receiver only ever learns about a transfer from those reports.
``MooncakeLink`` is one room's view, the TransportLink (with a peer that speaks the extension, also the
ProgressLink) that the controller polls.

As in the fork's receiver (``conn_multimodal.py:1048``), a room is WaitingForInput as soon as its Encode
rank is known; every later status comes from the wire. ``writes_stopped()`` is only ever what the remote
side said: a terminal status, or its acknowledgement of our abort. Against a fork peer no abort is sent
(it cannot parse one) and only the controller's drain deadline lifts a fence that no terminal status did.

A frame that cannot be right (malformed, truncated, duplicated, stale, for an unknown room) is logged,
counted in ``receiver.dropped[cause]`` and otherwise ignored: it never fails a request, and nothing the
socket delivers can raise through whichever link polls next.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import zmq

from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.mooncake import wire
from epd_receiver.adapters.ports.mooncake.bootstrap import (
    BootstrapUnavailable,
    Target,
    encode_rank_endpoint,
    target_of,
    wait_for_encode,
)
from epd_receiver.adapters.ports.mooncake.inbox import LanguageInbox, RoomView
from epd_receiver.adapters.ports.mooncake.pushes import Pushes
from epd_receiver.fsm import KVPoll, Room

PROTOCOL, METADATA, HOST = "tcp", "P2PHANDSHAKE", "127.0.0.1"
logger = logging.getLogger(__name__)


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

    def write_together(self, batches: Sequence[Batch]) -> list[int]:
        """Batches of writes into several peers' memory, all submitted before any is waited for, so that the
        peers receive at the same time instead of one after the other; a return code per batch, as ``write``."""
        if len(batches) == 1:
            return [self.write(*batches[0])]
        ids = [int(self._engine.batch_transfer_async_write(*batch)) for batch in batches]
        return [-1 if id_ == 0 else int(self._engine.get_batch_transfer_status([id_])) for id_ in ids]


Batch = tuple[str, list[int], list[int], list[int]]  # (peer session, sources, targets, lengths)


@dataclass(slots=True)
class WriteStats:
    """What a writing side's engine calls did, as both Encode-side writers report it."""

    bytes: int = 0  # landed: the batches that returned 0
    seconds: float = 0.0  # inside the engine's calls
    chunks: int = 0  # batches, one per destination rank of a chunk
    entries: int = 0
    failed_writes: int = 0

    def write_together(self, engine: Engine, batches: Sequence[Batch]) -> list[int]:
        """``engine.write_together(batches)``, timed and counted here."""
        began = time.perf_counter()
        codes = engine.write_together(batches)
        self.seconds += time.perf_counter() - began
        for (_, _, _, lengths), rc in zip(batches, codes, strict=True):
            self.chunks += 1
            self.entries += len(lengths)
            if rc == 0:
                self.bytes += sum(lengths)
            else:
                self.failed_writes += 1
        return codes


def coalesce(entries: Iterable[tuple[int, int, int]]) -> tuple[list[int], list[int], list[int]]:
    """Merge writes that continue each other on both sides: consecutive full rows become one entry."""
    sources: list[int] = []
    targets: list[int] = []
    lengths: list[int] = []
    for src, dst, length in entries:
        if sources and sources[-1] + lengths[-1] == src and targets[-1] + lengths[-1] == dst:
            lengths[-1] += length
        else:
            sources.append(src)
            targets.append(dst)
            lengths.append(length)
    return sources, targets, lengths


@dataclass(frozen=True, slots=True)
class Geometry:
    """A pool's shape. The fork's wire does not carry it: both sides are configured alike (B, H, K)."""

    num_blocks: int
    block_size: int
    hidden_size: int
    deepstack: int

    @classmethod
    def of(cls, buffers: TorchBlockBuffers) -> Geometry:
        return cls(buffers.num_blocks, buffers.block_size, buffers.hidden_size, buffers.deepstack_layers)


class PoolEngine(Protocol):
    """What a receiver needs of its engine: a session id (host:port) peers write to, and registration."""

    session: str

    def register(self, tensors: Sequence[torch.Tensor]) -> None: ...

    def unregister(self, tensors: Sequence[torch.Tensor]) -> None: ...


class SenderUnreachable(RuntimeError):
    """The Encode side cannot be reached (bootstrap, socket) or did not answer in time."""


def peer_address(frame: zmq.Frame) -> str:
    """The remote address ZMQ saw a frame come from, for log lines (PUSH/PULL carries no identity)."""
    try:
        return f"tcp peer {frame.get('Peer-Address')}"
    except (zmq.ZMQError, UnicodeDecodeError):
        return "an unknown peer"


# ---- the rank's end ---------------------------------------------------------------------------------


class MooncakeReceiver:
    """One Language rank's end of the transport: its registered pool, its PULL socket, a PUSH per Encode rank."""

    def __init__(
        self,
        engine: PoolEngine,
        buffers: TorchBlockBuffers,
        bootstrap: str,
        rank: int,
        *,
        tp_size: int = 1,
        dp_size: int = 1,
        extensions: bool = True,
        connect_timeout_s: float = 30.0,
    ) -> None:
        self.rank, self.tp_size, self.dp_size = rank, tp_size, dp_size
        self.bootstrap = bootstrap
        self.buffers = buffers
        self.inbox = LanguageInbox(f"Language rank {rank}", extended=extensions)
        self.dropped = self.inbox.dropped
        self.broken: str | None = None
        self._engine = engine
        self._context = zmq.Context.instance()
        self._pull: zmq.Socket[bytes] = self._context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self.port = self._pull.bind_to_random_port(f"tcp://{HOST}")
        self._pushes = Pushes(self._context)
        self._endpoints: dict[tuple[int, int], str] = {}
        engine.register(buffers.buffers())
        try:
            self.encode_tp, self.encode_dp = wait_for_encode(bootstrap, connect_timeout_s)
        except BaseException:
            self.close()
            raise

    # ---- peers -----------------------------------------------------------------------------------

    def connect(self, room: Room = 0, wait_s: float = 5.0) -> bool:
        """Register with the Encode rank of ``room`` now and wait up to ``wait_s`` for its hello.

        True when it speaks the extension; a fork peer never says so and costs the whole wait.
        """
        endpoint = self._endpoint(room)
        deadline = time.monotonic() + wait_s
        while not self.inbox.speakers[endpoint] and time.monotonic() < deadline:
            self.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        return self.inbox.speakers[endpoint]

    def speaks_extension(self, room: Room = 0) -> bool:
        return self.inbox.speakers.get(self._endpoint(room), False)

    def _endpoint(self, room: Room) -> str:
        """The Encode rank for ``room`` (bootstrap, cached); registers this rank's pool on first contact."""
        target = self._target(room)
        key = (target.engine_rank, target.dp_group)
        if key not in self._endpoints:
            endpoint = encode_rank_endpoint(self.bootstrap, target.engine_rank, target.dp_group)
            self._endpoints[key] = endpoint
            self.inbox.speakers.setdefault(endpoint, False)
            pointers, _, _ = self.buffers.get_buf_infos()
            features = wire.FEATURES if self.inbox.extended else frozenset()
            registration = wire.Registration(HOST, self.port, self._engine.session, tuple(pointers), features)
            self._push(endpoint, wire.encode_registration(registration))
        return self._endpoints[key]

    def _target(self, room: Room) -> Target:
        return target_of(
            room,
            language_rank=self.rank,
            language_tp=self.tp_size,
            language_dp=self.dp_size,
            encode_tp=self.encode_tp,
            encode_dp=self.encode_dp,
        )

    # ---- rooms -----------------------------------------------------------------------------------

    def link(self, room: Room, *, progress: bool = False) -> MooncakeLink:
        """A room's link; a ProgressLink when asked for and its Encode rank has said it reports progress."""
        if room in self.inbox.rooms:
            raise ValueError(f"room {room} already has a link on rank {self.rank}")
        try:
            view = RoomView(self._endpoint(room))
        except (BootstrapUnavailable, SenderUnreachable) as error:
            view = RoomView("", status=int(KVPoll.Bootstrapping), error=str(error))
        self.inbox.rooms[room] = view
        if progress and self.inbox.speakers.get(view.peer, False):
            return ProgressMooncakeLink(self, room)
        return MooncakeLink(self, room)

    def view(self, room: Room) -> RoomView:
        self.pump()
        return self.inbox.rooms[room]

    def forget(self, room: Room) -> None:
        self.inbox.rooms.pop(room, None)

    def send_transfer(self, room: Room, blocks: Sequence[int], allocated: int, sent: int | None) -> None:
        """An init (``sent`` None) or a resume; raises when the frames cannot be queued."""
        view = self.inbox.rooms[room]
        required = self._target(room).required_dst_info_num
        message = wire.TransferRequest(
            room, HOST, self.port, self._engine.session, tuple(blocks), required, allocated, sent
        )
        self._push(view.peer, wire.encode_transfer(message))
        view.init_sent = True

    def send_abort(self, room: Room) -> None:
        """Only to a peer that said hello; before that the abort waits for it, and a fork peer never gets one."""
        view = self.inbox.rooms[room]
        if view.stopped or not view.init_sent or view.abort in ("sent", "acked"):
            return
        if not self.inbox.speakers.get(view.peer, False):
            view.abort = "wanted"
            return
        self._push(view.peer, wire.encode_abort(wire.AbortRequest(room, self._engine.session)))
        view.abort = "sent"

    # ---- frames ----------------------------------------------------------------------------------

    def pump(self) -> int:
        """Apply every frame that has arrived, without waiting; the number handled. Never raises."""
        handled = 0
        while self.broken is None:
            try:
                frames = self._pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            except zmq.ZMQError as error:
                self.broken = f"the PULL socket of rank {self.rank} failed: {error}"
                logger.error("%s", self.broken)
                break
            spoke = self.inbox.receive([frame.bytes for frame in frames], peer_address(frames[0]))
            if spoke is not None:
                self._flush_aborts(spoke)
            handled += 1
        return handled

    def wait(self, timeout_s: float) -> int:
        """Sleep until a frame arrives or ``timeout_s`` passes; then apply what arrived."""
        if self.broken is None and self._pull.poll(int(timeout_s * 1000)):
            return self.pump()
        return 0

    def _flush_aborts(self, endpoint: str) -> None:
        """Aborts that waited for this peer's hello; called from ``pump``, so a failure is logged, not raised."""
        for room, view in self.inbox.rooms.items():
            if view.peer == endpoint and view.abort == "wanted":
                view.abort = ""
                try:
                    self.send_abort(room)
                except SenderUnreachable as error:
                    logger.warning("rank %d: the abort of room %d stays unsent: %s", self.rank, room, error)

    def _push(self, endpoint: str, frames: list[bytes]) -> None:
        try:
            self._pushes.send(endpoint, frames)
        except zmq.ZMQError as error:
            raise SenderUnreachable(f"rank {self.rank} cannot queue a message for {endpoint}: {error}") from error

    def close(self) -> None:
        """Unregister the pool and close the sockets; the engine stays for the next pool."""
        self._engine.unregister(self.buffers.buffers())
        self._pushes.close()
        self._pull.close(linger=0)


class MooncakeLink:
    """The TransportLink of one room: polls read what the wire said; messages go out at once."""

    __slots__ = ("_receiver", "room")

    def __init__(self, receiver: MooncakeReceiver, room: Room) -> None:
        self._receiver = receiver
        self.room = room

    def poll(self) -> int:
        """The status this rank has heard for the room; raises only when the link itself is unusable."""
        view = self._receiver.view(self.room)
        if view.error is not None or self._receiver.broken is not None:
            raise SenderUnreachable(view.error or self._receiver.broken)
        return view.status

    def init(self, blocks: Sequence[int], allocated_tokens: int) -> None:
        self._receiver.send_transfer(self.room, blocks, allocated_tokens, None)

    def resume(self, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None:
        self._receiver.send_transfer(self.room, blocks, allocated_tokens, sent_tokens)

    def abort(self) -> None:
        """Ask the sender to stop writing for this room, where it can understand the request."""
        self._receiver.send_abort(self.room)

    def writes_stopped(self) -> bool:
        """The Encode side said so: a Failed or Success it reported, or its acknowledgement of our abort."""
        return self._receiver.view(self.room).stopped

    def failure_reason(self) -> str | None:
        return self._receiver.view(self.room).reason


class ProgressMooncakeLink(MooncakeLink):
    """A link whose sender also reports the tokens landed so far: remainders may come in rounds."""

    __slots__ = ()

    def landed_tokens(self) -> int:
        return self._receiver.view(self.room).landed
