"""The producer: a vLLM encoder's worker writes each item it encoded into the consumer's blocks, chunk by chunk.

``save_caches(encoder_cache, mm_hash)`` (called by the model runner's EC mixin after the encoder,
vllm/v1/worker/ec_connector_model_runner_mixin.py:24-33) offers the item: its (T, H) embeddings, copied to
CPU memory registered with this worker's Mooncake transfer engine. A consumer asks for it by its room
(``room_of(mm_hash)``, the same on both sides) over the SGLang fork's wire, and a thread of this worker
writes what each grant allows: the embeddings of the tokens a block holds straight from the item's memory,
and with the first chunk the aux row (T; no M-RoPE delta, no checksum). The wire's bookkeeping is the
Encode side's own (``adapters/ports/mooncake/desk.py``): progress after every chunk, an abort acknowledged
and its room ended before the next chunk, a write the engine refuses (a consumer that died) ending the room.
Only embeddings and the aux row are written: a vLLM item has no token ids or M-RoPE rows to send.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping
from typing import Any

import torch
import zmq

from epd_receiver.adapters.integrations.vllm.scheduler import room_of
from epd_receiver.adapters.ports.buffers import AUX_INTS
from epd_receiver.adapters.ports.mooncake.bootstrap import register_encode
from epd_receiver.adapters.ports.mooncake.desk import KV_BOOTSTRAPPING, KV_WAITING, EncodeDesk, RoomPlan, Write
from epd_receiver.adapters.ports.mooncake.link import HOST, Batch, Engine, WriteStats, coalesce, peer_address
from epd_receiver.adapters.ports.mooncake.pushes import Pushes, flush_outbox

__all__ = ["ItemProducer"]

logger = logging.getLogger(__name__)

EMBEDDINGS, AUX, BUFFERS = 0, 3, 4  # the consumer pool's buffers, in get_buf_infos order (no deepstack)


class ItemProducer:
    """One producer worker's end: offered items, the wire, and the thread that writes."""

    def __init__(self, extra: Mapping[str, Any]) -> None:
        self.block_size = int(extra.get("block_size", 1024))
        self.hidden_size = int(extra["hidden_size"])
        self.engine = Engine()
        self._context = zmq.Context.instance()
        self._pull: zmq.Socket[bytes] = self._context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        port = self._pull.bind_to_random_port(f"tcp://{HOST}")
        self._pushes = Pushes(self._context)
        self.desk = EncodeDesk(f"{HOST}:{port}")
        self.desk.begin(self.block_size, BUFFERS, [])
        self._aux = torch.zeros(AUX_INTS, dtype=torch.int32)
        self.engine.register([self._aux])
        self._items: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.writes = WriteStats()
        self._running = True
        register_encode(str(extra["bootstrap"]), rank_ip=HOST, rank_port=port)
        self._thread = threading.Thread(target=self._serve, name="epd-producer", daemon=True)
        self._thread.start()

    def offer(self, mm_hash: str, embeddings: torch.Tensor) -> int:
        """The item may be written to whoever asks for its room (returned); asks that came first are served now."""
        item = embeddings.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
        room = room_of(mm_hash)
        self.engine.register([item])
        with self._lock:
            old = self._items.pop(room, None)
            self._items[room] = item
            self.desk.plans[room] = RoomPlan(room, int(item.shape[0]), seed=0)
            self.desk.ended.pop(room, None)  # offered again: a new fetch of it is not a stale frame
            state = self.desk.rooms.get(room)
            if state is not None and state.status == KV_BOOTSTRAPPING and len(state.targets) >= state.required:
                state.status = KV_WAITING
                self.desk.ready.append(room)
        if old is not None:
            self.engine.unregister([old])
        return room

    def close(self) -> None:
        self._running = False
        self._thread.join(timeout=5)
        self._pull.close(linger=0)
        self._pushes.close()

    # ---- the thread ------------------------------------------------------------------------------

    def _serve(self) -> None:
        while self._running:
            if self._pull.poll(0 if self.desk.ready else 20):
                self._drain()
            with self._lock:
                self._flush()
                room = self.desk.next_room()
                if room is not None:
                    self._write_chunk(room)
                    self._flush()
                    self._drop_ended()

    def _drain(self) -> None:
        while True:
            try:
                frames = self._pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            with self._lock:
                self.desk.receive([frame.bytes for frame in frames], peer_address(frames[0]))

    def _flush(self) -> None:
        flush_outbox(self.desk, self._pushes, "producer")

    def _drop_ended(self) -> None:
        """Items whose room ended (delivered, failed or aborted) are let go; an offer again brings one back."""
        for room in [room for room in self._items if room in self.desk.ended]:
            self.engine.unregister([self._items.pop(room)])

    def _write_chunk(self, room: int) -> None:
        writes = self.desk.writes(room)
        if isinstance(writes, str):
            return self.desk.fail(room, writes)
        item = self._items[room]
        batches = [self._batch(item, write) for write in writes]
        codes = self.writes.write_together(self.engine, batches)  # every consumer rank's share at once
        for write, rc in zip(writes, codes, strict=True):
            if rc != 0:
                return self.desk.fail(room, f"transfer failed: the transfer engine returned {rc}")
            self.desk.landed(room, write.session, write.tokens)
        self.desk.finish_chunk(room, any(write.partial for write in writes))

    def _batch(self, item: torch.Tensor, write: Write) -> Batch:
        """One rank's share: the aux row first, then the embeddings of each granted block from the item's own
        memory, blocks that follow each other on both sides in one entry."""
        b, row = self.block_size, self.hidden_size * item.element_size()
        entries = []
        if write.with_aux:
            self._aux[0] = int(item.shape[0])
            entries.append(
                (self._aux.data_ptr(), write.pointers[AUX] + write.pairs[0][1] * self._aux.nbytes, self._aux.nbytes)
            )
        for index, block, tokens in write.pairs:
            source = item.data_ptr() + (write.start + index * b) * row
            entries.append((source, write.pointers[EMBEDDINGS] + block * b * row, tokens * row))
        return (write.session, *coalesce(entries))

    def stats(self) -> dict[str, Any]:
        """Bytes written, seconds in the engine's writes, writes refused, and frames dropped by cause."""
        with self._lock:
            dropped = dict(self.desk.dropped)
        return dataclasses.asdict(self.writes) | {"dropped": dropped}
