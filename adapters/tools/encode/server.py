"""The Encode side as a process of its own: it speaks the SGLang fork's wire and writes with Mooncake.

At start it binds a PULL socket, registers it with the bootstrap server as the fork's Encode manager
does (``conn_multimodal.py:784-808`` of ZhengWG/sglang at cca20b0), and serves two sockets: that PULL
socket for the fork's wire (``EncodeDesk`` decides what every frame means) and a ROUTER socket for the
simulation's control plane (``control``). Statuses go back over PUSH sockets to the ip and port
each init named. Every rank is a destination of its own and receives a full copy.

Frames are handled between chunks, so an abort stops the writes of its room before the next chunk and
is then acknowledged. No frame ends this process: what cannot be right is dropped and counted
(``stats()["dropped"]``); a room whose request cannot be served fails alone.

With a raw target named (``raw_target``: scratch memory a Language rank registered beside its pool),
every chunk is followed by a raw write of as many bytes into that scratch, so that the write path and the
engine's best are timed under the same load, in the same run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from epd_receiver.adapters.ports.mooncake.bootstrap import BootstrapUnavailable, register_encode
from epd_receiver.adapters.ports.mooncake.desk import TRANSFER_ERROR_ON_RESUME, EncodeDesk, RoomPlan, Write, same_rows
from epd_receiver.adapters.ports.mooncake.link import HOST, Engine, Geometry, WriteStats, peer_address
from epd_receiver.adapters.ports.mooncake.pushes import Pushes, flush_outbox
from epd_receiver.adapters.ports.mooncake.wire import MALFORMED, DropLog
from epd_receiver.adapters.ports.sender import InProcessSender
from epd_receiver.adapters.ports.source import SourcePayload
from epd_receiver.adapters.tools.encode.control import decode_json, send_json
from epd_receiver.adapters.tools.encode.write import Staging, regenerate, source_generator

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Stats(WriteStats):
    """The chunks' writes, and the raw writes that mirrored them."""

    raw_bytes: int = 0  # raw writes that mirrored the chunks, into the raw target
    raw_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class RawTarget:
    """Registered scratch memory of a Language rank: raw writes land there, never in its pool."""

    session: str
    pointer: int
    nbytes: int


class EncodeServer:
    """The Encode side's loop: frames in, chunks out through the engine, statuses back."""

    def __init__(self, control: str, bootstrap: str, *, register_timeout_s: float = 30.0) -> None:
        self.engine = Engine()
        context = zmq.Context.instance()
        self._wire: zmq.Socket[bytes] = context.socket(zmq.PULL)
        self._wire.setsockopt(zmq.LINGER, 0)
        self.rank_port = self._wire.bind_to_random_port(f"tcp://{HOST}")
        self._control: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
        self._control.setsockopt(zmq.LINGER, 0)
        self._control.bind(control)
        self._pushes = Pushes(context)
        self.desk = EncodeDesk(f"{HOST}:{self.rank_port}")
        self.control_drops = DropLog("Encode control")
        self._staging: Staging | None = None
        self._generators: dict[tuple[int, Geometry], InProcessSender] = {}
        self._sources: dict[int, SourcePayload] = {}
        self._kill_on_resume: int | None = None
        self._raw: RawTarget | None = None
        self.stats = Stats()
        self.running = True
        self._register(bootstrap, register_timeout_s)

    def _register(self, bootstrap: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return register_encode(bootstrap, rank_ip=HOST, rank_port=self.rank_port)
            except BootstrapUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    # ---- the loop --------------------------------------------------------------------------------

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wire, zmq.POLLIN)
        poller.register(self._control, zmq.POLLIN)
        while self.running:
            events = dict(poller.poll(0 if self.desk.ready else 50))
            if self._wire in events:
                self._drain_wire()
            if self._control in events:
                self._drain_control()
            self._flush()
            room = self.desk.next_room()
            if room is not None:
                self._write_chunk(room)
                self._flush()
                self._sources = {r: s for r, s in self._sources.items() if r in self.desk.rooms}

    def _drain_wire(self) -> None:
        while True:
            try:
                frames = self._wire.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.desk.receive([frame.bytes for frame in frames], peer_address(frames[0]))

    def _flush(self) -> None:
        flush_outbox(self.desk, self._pushes, "Encode")

    def close(self) -> None:
        for socket in [self._wire, self._control]:
            socket.close(linger=0)
        self._pushes.close()

    # ---- writing ---------------------------------------------------------------------------------

    def _write_chunk(self, room: int) -> None:
        writes = self.desk.writes(room)
        staging = self._staging
        if isinstance(writes, str) or staging is None:
            return self.desk.fail(room, writes if isinstance(writes, str) else "no pool geometry configured")
        if any(len(w.pairs) > staging.geometry.num_blocks for w in writes):
            return self.desk.fail(room, f"a chunk larger than the {staging.geometry.num_blocks} staging rows")
        plan = self.desk.plans[room]
        source = self._source(plan, staging.geometry)
        resuming = not writes[0].with_aux
        if resuming:
            self._maybe_die(staging, source, writes[0])
        for group in same_rows(writes):
            first = group[0]
            staging.stage(source, first.start, first.tokens, with_aux=first.with_aux)
            codes = self._write(staging, group, broken=resuming and plan.fault == TRANSFER_ERROR_ON_RESUME)
            for write, rc in zip(group, codes, strict=True):
                if rc != 0:
                    return self.desk.fail(room, f"transfer failed: the transfer engine returned {rc}")
                self.desk.landed(room, write.session, write.tokens)
        self.desk.finish_chunk(room, any(write.partial for write in writes))

    def _maybe_die(self, staging: Staging, source: SourcePayload, write: Write) -> None:
        if self._kill_on_resume is None:
            return
        self._kill_on_resume -= 1
        if self._kill_on_resume <= 0:
            staging.stage(source, write.start, write.tokens, with_aux=False)
            half = dataclasses.replace(write, pairs=write.pairs[: max(1, len(write.pairs) // 2)])
            self._write(staging, [half])
            os.kill(os.getpid(), signal.SIGKILL)  # die in the middle of the resume, as a crash would

    def _write(self, staging: Staging, writes: list[Write], *, broken: bool = False) -> list[int]:
        """The staged chunk into every target of ``writes`` at once (one batch each); a return code per write."""
        batches = []
        for write in writes:
            sources, targets, lengths = staging.plan(write.pointers, write.pairs, write.with_aux)
            if broken:  # a destination address outside the registered pool: the engine itself refuses it
                targets = [t + (1 << 40) for t in targets]
            batches.append((write.session, sources, targets, lengths))
        codes = self.stats.write_together(self.engine, batches)
        if self._raw is not None and not any(codes):
            self._mirror(staging, self._raw, sum(sum(lengths) for *_, lengths in batches))
        return codes

    def _mirror(self, staging: Staging, raw: RawTarget, total: int) -> None:
        """A raw write of the chunk's bytes into the raw target, timed apart from the chunk's own."""
        moved, seconds, rc = self._raw_writes(staging, raw.session, raw.pointer, raw.nbytes, total)
        if rc != 0:
            logger.warning("Encode: raw writes into %s returned %d; no more are made this run", raw.session, rc)
            self._raw = None
            return
        self.stats.raw_bytes += moved
        self.stats.raw_seconds += seconds

    def _raw_writes(
        self, staging: Staging, session: str, pointer: int, span: int, total: int
    ) -> tuple[int, float, int]:
        """``total`` bytes of staged rows into ``[pointer, pointer + span)``, in synchronous writes as large
        as both allow: (bytes, seconds, the first nonzero return code or 0)."""
        span = min(span, staging.rows.embeddings.nbytes)
        moved, began, rc = 0, time.perf_counter(), 0
        while moved < total and rc == 0:
            length = min(span, total - moved)
            rc = self.engine.write(session, [staging.pointers[0]], [pointer], [length])
            moved += length
        return moved, time.perf_counter() - began, rc

    def _source(self, plan: RoomPlan, geometry: Geometry) -> SourcePayload:
        """One source per room, shared by every Language rank it is written to."""
        if plan.room not in self._sources:
            key = (plan.seed, geometry)
            if key not in self._generators:
                self._generators[key] = source_generator(plan.seed, geometry)
            generator = self._generators[key]
            self._sources[plan.room] = regenerate(generator, plan.room, plan.total_tokens, checksum=plan.checksum)
        return self._sources[plan.room]

    # ---- the control plane -----------------------------------------------------------------------

    def _drain_control(self) -> None:
        while True:
            try:
                frames = self._control.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            message = decode_json(frames[-1]) if len(frames) == 2 else None
            if message is None:
                self.control_drops.drop(MALFORMED, "a control client", f"{len(frames)} frames, not one JSON op")
                continue
            self._control_op(frames[0], message)

    def _control_op(self, identity: bytes, message: dict[str, Any]) -> None:
        op = message["op"]
        try:
            reply = self._answer(op, message)
        except (KeyError, TypeError, ValueError) as error:
            self.control_drops.drop(MALFORMED, "a control client", f"{op}: {error!r}")
            return
        send_json(self._control, {"op": f"{op}_reply", **reply}, identity)

    def _answer(self, op: str, message: dict[str, Any]) -> dict[str, Any]:
        if op == "begin":
            self._begin(Geometry(*message["geometry"]), [RoomPlan(*plan) for plan in message["plans"]])
        elif op == "stats":
            return dataclasses.asdict(self.stats) | {"dropped": dict(self.desk.dropped)}
        elif op == "bench":
            return self._bench(str(message["session"]), int(message["bytes"]))
        elif op == "raw_target":
            self._raw = RawTarget(str(message["session"]), int(message["pointer"]), int(message["bytes"]))
        elif op == "arm_kill":
            self._kill_on_resume = int(message["resumes"])
        elif op == "stop":
            self.running = False
        else:
            raise ValueError(f"unknown control op {op!r}")
        return {}

    def _begin(self, geometry: Geometry, plans: list[RoomPlan]) -> None:
        if self._staging is None or self._staging.geometry != geometry:
            if self._staging is not None:
                self._staging.close()
            self._staging = Staging(self.engine, geometry)
        self.desk.begin(geometry.block_size, len(self._staging.pointers), plans)
        self._sources.clear()
        self._raw = None  # named anew by a rank of this workload, if it wants the raw writes
        self._pushes.close()  # the last workload's Language ranks are gone

    def _bench(self, session: str, total: int) -> dict[str, Any]:
        """Raw engine throughput into ``session``'s pool: ``total`` bytes in writes as large as rows allow."""
        peer, staging = self.desk.peers.get(session), self._staging
        if peer is None or staging is None:
            raise ValueError(f"no pool registered by {session}")
        moved, seconds, rc = self._raw_writes(staging, session, peer.pointers[0], staging.rows.embeddings.nbytes, total)
        return {"bytes": moved, "seconds": seconds, "rc": rc}


def serve(control: str, bootstrap: str, threads: int = 1) -> None:
    """Process entry point: run the Encode side until a ``stop`` control message."""
    torch.set_num_threads(threads)
    server = EncodeServer(control, bootstrap)
    try:
        server.serve()
    finally:
        server.close()
