"""The Encode side as a process of its own: it owns the source rows and writes them into every rank's pool.

It keeps the original sender's semantics (those of ``InProcessSender``, which a real sender must match):
per destination and room a ``sent_tokens`` that a resume overwrites, one pending chunk, and a status that
only goes up except to Failed. A first chunk writes ``min(T, allocated)`` tokens and the aux row of its
first block; a resume starts at source block ``sent_tokens // B`` and writes no aux row. Every rank is a
destination of its own and receives a full copy.

A chunk is produced into this process's own registered rows (the encoder's output buffers, reused from
one chunk to the next: this loop writes one chunk at a time, synchronously) and moved with one
``batch_transfer_sync_write``: per block pair and per buffer, the bytes of the tokens the block holds,
from the source row to the destination row, the aux row only for the first block of the first chunk.
Sources derive from (seed, room, T) through ``InProcessSender``'s own generator, so a receiver verifies
bit for bit by regenerating them, and nothing but status crosses the wire.

Messages are handled between chunks, so an abort stops the writes of its room before the next chunk and
is then acknowledged; the receiver fences that room's blocks until it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp
import zmq

from epd_receiver.fsm import KVPoll, Room

from .buffers import TorchBlockBuffers
from .mooncake import HOST, Engine, Geometry, SenderUnreachable, decode, send
from .ranks import free_port
from .sender import InProcessSender, SourcePayload

AUX = 3  # the aux buffer's index in get_buf_infos order: embeddings, ids, M-RoPE, aux, deepstack
FAIL_ON_RESUME, TRANSFER_ERROR_ON_RESUME = "fail_on_resume", "transfer_error_on_resume"


@dataclass(frozen=True, slots=True)
class Destination:
    """One rank's registered pool: its engine session and, per buffer, the base pointer and row length."""

    session: str
    pointers: tuple[int, ...]
    item_lens: tuple[int, ...]
    geometry: Geometry


@dataclass(slots=True)
class Chunk:
    blocks: tuple[int, ...]
    sent_tokens: int
    allocated_tokens: int


@dataclass(slots=True)
class _Transfer:
    """One room towards one destination."""

    source: SourcePayload
    progress: bool
    fault: str | None
    status: KVPoll = KVPoll.WaitingForInput
    sent_tokens: int = 0
    pending: Chunk | None = None


@dataclass(slots=True)
class Stats:
    bytes: int = 0
    seconds: float = 0.0
    chunks: int = 0
    entries: int = 0
    failed_writes: int = 0


def write_entries(
    source: Destination, target: Destination, pairs: list[tuple[int, int, int]], with_aux: bool
) -> Iterator[tuple[int, int, int]]:
    """(src, dst, length) for every buffer of every (src row, dst row, tokens) pair, SGLang's arithmetic.

    A per-token buffer moves ``item_len * n // B`` bytes of a row holding n tokens (M-RoPE's three packed
    runs included); the aux row moves whole, and only with the first pair of a first chunk. Buffer by
    buffer, so that rows following each other on both sides come out next to each other.
    """
    b = target.geometry.block_size
    for j, item_len in enumerate(target.item_lens):
        for i, (src_row, dst_row, n) in enumerate(pairs):
            if j == AUX and not (with_aux and i == 0):
                continue
            length = item_len if j == AUX else item_len * n // b
            yield source.pointers[j] + src_row * item_len, target.pointers[j] + dst_row * item_len, length


def coalesce(entries: Iterator[tuple[int, int, int]]) -> tuple[list[int], list[int], list[int]]:
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


class EncodeServer:
    """The Encode side's loop: messages in over a ROUTER socket, chunks out through the engine, status back."""

    def __init__(self, endpoint: str) -> None:
        self.engine = Engine()
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(endpoint)
        self._destinations: dict[bytes, Destination] = {}
        self._transfers: dict[tuple[bytes, Room], _Transfer] = {}
        self._work: deque[tuple[bytes, Room]] = deque()
        self._staging: TorchBlockBuffers | None = None
        self._staging_info: Destination | None = None
        self._staged: tuple[SourcePayload, int, int] | None = None  # (source, first token, tokens) in the rows
        self._generators: dict[tuple[int, Geometry], InProcessSender] = {}
        self._sources: dict[tuple[int, Room, int, bool], tuple[SourcePayload, int]] = {}
        self._kill_on_resume: int | None = None
        self.stats = Stats()
        self.running = True

    # ---- the loop --------------------------------------------------------------------------------

    def serve(self) -> None:
        while self.running:
            if self._socket.poll(0 if self._work else 50):
                while self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    identity, frame = self._socket.recv_multipart()
                    self._handle(identity, decode(frame))
            if self._work:
                self._write_next()

    def close(self) -> None:
        self._socket.close(linger=0)

    def _handle(self, identity: bytes, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "hello":
            self._hello(identity, message)
        elif op == "request":
            self._request(identity, message)
        elif op in ("init", "resume"):
            self._chunk(identity, message)
        elif op == "abort":
            self._abort(identity, int(message["room"]))
        elif op == "stats":
            send(self._socket, {"op": "stats_reply", **dataclasses.asdict(self.stats)}, identity)
        elif op == "bench":
            self._bench(identity, int(message["bytes"]))
        elif op == "arm_kill":
            self._kill_on_resume = int(message["resumes"])
            send(self._socket, {"op": "arm_kill_reply"}, identity)
        elif op == "stop":
            self.running = False
            send(self._socket, {"op": "stop_reply"}, identity)

    # ---- what the receivers send -----------------------------------------------------------------

    def _hello(self, identity: bytes, message: dict[str, Any]) -> None:
        geometry = Geometry(*message["geometry"])
        self._destinations[identity] = Destination(
            message["session"], tuple(message["ptrs"]), tuple(message["item_lens"]), geometry
        )
        self._ensure_staging(geometry)
        send(self._socket, {"op": "hello_reply", "session": self.engine.session}, identity)

    def _request(self, identity: bytes, message: dict[str, Any]) -> None:
        room = int(message["room"])
        destination = self._destinations[identity]
        source = self._acquire_source(
            int(message["seed"]), room, int(message["total_tokens"]), bool(message["checksum"]), destination.geometry
        )
        self._transfers[identity, room] = _Transfer(source, bool(message["progress"]), message.get("fault"))
        self._publish(identity, room, KVPoll.WaitingForInput)  # the handshake: this side knows the request

    def _chunk(self, identity: bytes, message: dict[str, Any]) -> None:
        room = int(message["room"])
        transfer = self._transfers.get((identity, room))
        if transfer is None:
            return  # a room that ended here: the original drops such a message too
        blocks, sent, allocated = (
            tuple(message["blocks"]),
            int(message["sent_tokens"]),
            int(message["allocated_tokens"]),
        )
        if message["op"] == "resume" and transfer.status is not KVPoll.Transferring:
            return
        b = self._destinations[identity].geometry.block_size
        if not blocks or allocated // len(blocks) != b:
            self._fail(identity, room, f"block size mismatch: {allocated} tokens over {len(blocks)} blocks, B={b}")
            return
        if message["op"] == "resume":
            transfer.sent_tokens = sent
            if transfer.fault == FAIL_ON_RESUME:
                self._fail(identity, room, "the encoder failed while resuming (injected)")
                return
        transfer.pending = Chunk(blocks, sent, allocated)
        self._work.append((identity, room))

    def _abort(self, identity: bytes, room: Room) -> None:
        """Stop writing for the room (no write is in progress: this loop writes synchronously), then ack."""
        transfer = self._transfers.pop((identity, room), None)
        if transfer is not None:
            self._release_source(transfer.source)
        send(self._socket, {"op": "abort_ack", "room": room}, identity)

    # ---- writing ---------------------------------------------------------------------------------

    def _write_next(self) -> None:
        identity, room = self._work.popleft()
        transfer = self._transfers.get((identity, room))
        if transfer is None or transfer.pending is None:
            return  # aborted while queued
        chunk, transfer.pending = transfer.pending, None
        destination = self._destinations[identity]
        b = destination.geometry.block_size
        source = transfer.source
        remaining = source.total_tokens - chunk.sent_tokens
        tokens = min(remaining, chunk.allocated_tokens)
        needed = -(-tokens // b)
        if needed > len(chunk.blocks):
            self._fail(identity, room, f"insufficient dst blocks: {tokens} tokens, {len(chunk.blocks)} blocks")
            return
        start = (chunk.sent_tokens // b) * b  # source block sent_tokens // B, as the original restarts
        pairs = self._stage(source, start, tokens, with_aux=chunk.sent_tokens == 0)
        plan = [(row, block, n) for (row, n), block in zip(pairs, chunk.blocks, strict=False)]
        resuming = chunk.sent_tokens > 0
        if resuming and self._kill_on_resume is not None:
            self._kill_on_resume -= 1
            if self._kill_on_resume <= 0:
                self._write(destination, plan[: max(1, len(plan) // 2)], with_aux=False)
                os.kill(os.getpid(), signal.SIGKILL)  # die in the middle of the resume, as a crash would
        broken = resuming and transfer.fault == TRANSFER_ERROR_ON_RESUME
        rc = self._write(destination, plan, with_aux=not resuming, broken=broken)
        if rc != 0:
            self._fail(identity, room, f"transfer failed: batch_transfer_sync_write returned {rc}")
            return
        transfer.sent_tokens = chunk.sent_tokens + tokens
        self._publish(identity, room, KVPoll.Transferring if tokens < remaining else KVPoll.Success)

    def _stage(self, source: SourcePayload, start: int, tokens: int, *, with_aux: bool) -> list[tuple[int, int]]:
        """Produce tokens [start, start + tokens) into staging rows 0, 1, ...; (row, tokens) per row.

        The same chunk for the next rank is usually next in line: then the rows already hold it.
        """
        assert self._staging is not None
        b = self._staging.block_size
        rows = [(row, min(b, start + tokens - lo)) for row, lo in enumerate(range(start, start + tokens, b))]
        staged = self._staged
        if staged is None or staged[0] is not source or staged[1:] != (start, tokens):
            for (row, n), lo in zip(rows, range(start, start + tokens, b), strict=True):
                source.write_tokens(lo, lo + n, self._staging.block_views(row, n))
            self._staged = (source, start, tokens)  # holding the source: its identity cannot be reused
        if with_aux:
            self._staging.write_aux(0, source.total_tokens, source.mrope_delta, source.checksum)
        return rows

    def _write(
        self, destination: Destination, plan: list[tuple[int, int, int]], *, with_aux: bool, broken: bool = False
    ) -> int:
        assert self._staging_info is not None
        sources, targets, lengths = coalesce(write_entries(self._staging_info, destination, plan, with_aux))
        if broken:  # a destination address outside the registered pool: the engine itself refuses it
            targets = [t + (1 << 40) for t in targets]
        began = time.perf_counter()
        rc = self.engine.write(destination.session, sources, targets, lengths)
        self.stats.seconds += time.perf_counter() - began
        self.stats.chunks += 1
        self.stats.entries += len(lengths)
        if rc == 0:
            self.stats.bytes += sum(lengths)
        else:
            self.stats.failed_writes += 1
        return rc

    def _bench(self, identity: bytes, total: int) -> None:
        """Raw engine throughput on this destination: ``total`` bytes in writes as large as the rows allow."""
        assert self._staging is not None
        destination = self._destinations[identity]
        span = min(self._staging.embeddings.nbytes, destination.geometry.num_blocks * destination.item_lens[0])
        source = self._staging.embeddings.data_ptr()
        moved, began, rc = 0, time.perf_counter(), 0
        while moved < total and rc == 0:
            length = min(span, total - moved)
            rc = self.engine.write(destination.session, [source], [destination.pointers[0]], [length])
            moved += length
        seconds = time.perf_counter() - began
        send(self._socket, {"op": "bench_reply", "bytes": moved, "seconds": seconds, "rc": rc}, identity)

    # ---- status ----------------------------------------------------------------------------------

    def _publish(self, identity: bytes, room: Room, status: KVPoll, reason: str | None = None) -> None:
        transfer = self._transfers[identity, room]
        if transfer.status is not KVPoll.Failed:
            transfer.status = KVPoll.Failed if status is KVPoll.Failed else max(transfer.status, status)
        message: dict[str, Any] = {"op": "status", "room": room, "status": int(transfer.status)}
        if transfer.progress:
            message["landed"] = transfer.sent_tokens
        if reason is not None:
            message["reason"] = reason
        send(self._socket, message, identity)
        if transfer.status in (KVPoll.Success, KVPoll.Failed):
            del self._transfers[identity, room]  # nothing more will be written for it
            self._release_source(transfer.source)

    def _fail(self, identity: bytes, room: Room, reason: str) -> None:
        self._publish(identity, room, KVPoll.Failed, reason)

    # ---- sources and staging ---------------------------------------------------------------------

    def _acquire_source(
        self, seed: int, room: Room, total_tokens: int, checksum: bool, geometry: Geometry
    ) -> SourcePayload:
        """The same source for every rank that asks: generated once, shared while any rank uses it."""
        key = (seed, room, total_tokens, checksum)
        if key in self._sources:
            source, users = self._sources[key]
            self._sources[key] = (source, users + 1)
            return source
        source = regenerate(self._generator(seed, geometry), room, total_tokens, checksum=checksum)
        self._sources[key] = (source, 1)
        return source

    def _release_source(self, source: SourcePayload) -> None:
        for key, (held, users) in list(self._sources.items()):
            if held is source:
                if users > 1:
                    self._sources[key] = (held, users - 1)
                else:
                    del self._sources[key]
                return

    def _generator(self, seed: int, geometry: Geometry) -> InProcessSender:
        key = (seed, geometry)
        if key not in self._generators:
            self._generators[key] = source_generator(seed, geometry)
        return self._generators[key]

    def _ensure_staging(self, geometry: Geometry) -> None:
        """Registered rows for one chunk of the largest pool seen (a chunk never exceeds its pool)."""
        if self._staging is not None and Geometry.of(self._staging) == geometry:
            return
        if self._staging is not None:
            self.engine.unregister(self._staging.buffers())
        self._staging = TorchBlockBuffers(
            geometry.num_blocks, geometry.block_size, geometry.hidden_size, geometry.deepstack
        )
        self.engine.register(self._staging.buffers())
        self._staged = None
        pointers, _, item_lens = self._staging.get_buf_infos()
        self._staging_info = Destination(self.engine.session, tuple(pointers), tuple(item_lens), geometry)


# ---- sources, shared with the receivers that verify -------------------------------------------------


def source_generator(seed: int, geometry: Geometry) -> InProcessSender:
    """The in-process sender used only for its generator: (seed, room, T) -> the exact same source anywhere."""
    rows = TorchBlockBuffers(1, geometry.block_size, geometry.hidden_size, geometry.deepstack)
    return InProcessSender(rows, seed=seed)


def regenerate(generator: InProcessSender, room: Room, total_tokens: int, *, checksum: bool = False) -> SourcePayload:
    """Room ``room``'s source of ``total_tokens`` tokens, exactly as the sender of that seed produces it."""
    generator.add_room(room, total_tokens, checksum=checksum)
    source = generator.source(room)
    generator.forget(room)
    return source


def serve(endpoint: str, threads: int = 1) -> None:
    """Process entry point: run the Encode side on ``endpoint`` until a ``stop`` message."""
    torch.set_num_threads(threads)
    server = EncodeServer(endpoint)
    try:
        server.serve()
    finally:
        server.close()


class EncodeProcess:
    """The Encode side in a spawned process, driven over a control socket of its own (stats, faults, stop)."""

    def __init__(self, endpoint: str | None = None, *, start_timeout_s: float = 60.0) -> None:
        self.endpoint = endpoint or f"tcp://{HOST}:{free_port()}"
        self.process = mp.get_context("spawn").Process(
            target=serve, args=(self.endpoint,), daemon=True, name="epd-encode"
        )
        self.process.start()
        self._control: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self._control.setsockopt(zmq.LINGER, 0)
        self._control.connect(self.endpoint)
        try:
            self.call("stats", start_timeout_s)
        except BaseException:
            self.kill()
            raise

    def call(self, op: str, timeout_s: float = 10.0, **fields: Any) -> dict[str, Any]:
        """Send one control message and wait for its ``<op>_reply``."""
        send(self._control, {"op": op, **fields})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.process.is_alive():
                raise SenderUnreachable(f"the Encode process died (exit code {self.process.exitcode})")
            if self._control.poll(100):
                reply = decode(self._control.recv())
                if reply["op"] == f"{op}_reply":
                    return reply
        raise SenderUnreachable(f"the Encode process did not answer {op!r} within {timeout_s:g} s")

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def arm_kill(self, resumes: int = 1) -> None:
        """Fault injection: the process kills itself halfway through writing its ``resumes``-th resume chunk."""
        self.call("arm_kill", resumes=resumes)

    @property
    def alive(self) -> bool:
        return bool(self.process.is_alive())

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.alive:
            with contextlib.suppress(SenderUnreachable):
                self.call("stop", timeout_s)
        self.process.join(timeout_s)
        self.kill()

    def kill(self) -> None:
        """End the process by its own pid, at once (also what a crash looks like to the receivers)."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self._control.close(linger=0)
