"""The scheduler side of the consumer: one controller request per multimodal item, over a bounded CPU pool.

vLLM's scheduler asks, per step and in this order (vllm/v1/core/sched/scheduler.py, 0.33.0):

1. ``ensure_cache_available(request, num_computed_tokens)`` for a running request with multimodal features
   (:827-836) and on the waiting path (:1247, :1271, through ``_ec_transfer_pending`` :2678-2686): here an item
   not yet known starts (a new room in the controller, its size vLLM's own ``get_num_embeds()``); False while
   any item the request still needs is in flight, so the request waits a step;
2. ``has_cache_item(mm_hash)`` while it picks encoder inputs (:2190): True once the item is assembled;
3. ``update_state_after_alloc(request, index)`` after the encoder cache entry is allocated (:2012-2013):
   the item is loaded by the workers this step;
4. ``build_connector_meta(scheduler_output)`` once per ``schedule()`` (:1768-1772): the controller steps here,
   once per engine step, and the step's loads go to every worker;
5. after the workers ran: ``take_unavailable_requests()`` (:2559-2562): requests with an item that FAILED, which
   the scheduler finishes with an error; then ``update_connector_output`` (:2585-2586) with the workers'
   aggregated ``LoadedMetadata``; then ``get_ec_connector_stats`` (:2606-2620);
6. ``update_state_after_free(request, index)`` (:2859-2860) once an input is in the KV cache, and
   ``request_finished(request)`` (:3047-3049) when a request ends, before its encoder cache is freed;
7. ``has_pending_push_work()`` (:3179-3182): the engine keeps stepping while the controller holds a request,
   so deadlines run and fences lift even when no request is left.

An item nobody needs any more (every request that wanted it finished) is aborted in the controller: it fails
``Aborted`` and keeps its blocks fenced until the producer is known to have stopped or the drain deadline
passes, exactly as in the SGLang bridge. The assembled payload is fresh memory of its own (the pool's blocks go
back at once), handed to the workers in the step's metadata; it is dropped once every worker loaded it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from epd_receiver.adapters.integrations.vllm.config import ConsumerConfig
from epd_receiver.adapters.integrations.vllm.metadata import LoadedMetadata, LoadMetadata
from epd_receiver.adapters.ports.allocator import OwningBlockAllocator
from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.fsm import (
    RankDisagreement,
    ReceiverError,
    ReceiverQueue,
    ReceiverRequest,
    Room,
    SizeMismatch,
    State,
    TransportFailed,
)
from epd_receiver.fsm.ports import Clock, ReceiverMetrics

__all__ = ["Item", "LinkRequest", "ReceiveScheduler", "room_of"]

logger = logging.getLogger(__name__)


def room_of(mm_hash: str) -> Room:
    """The item's room on both sides: the fork's wire names a transfer by an integer room only, so producer
    and consumer derive it from vLLM's mm_hash alike (63 bits of its BLAKE2b digest)."""
    return int.from_bytes(hashlib.blake2b(mm_hash.encode(), digest_size=8).digest(), "big") >> 1


@dataclass(frozen=True, slots=True)
class LinkRequest:
    """What a link factory is told about an item it must fetch: the controller's room, vLLM's hash and size,
    the pool the producer writes into, and the connector's extra config (where the producer is)."""

    room: Room
    mm_hash: str
    num_embeds: int
    buffers: TorchBlockBuffers
    extra: Mapping[str, Any]


LinkFactory = Callable[[LinkRequest], Any]  # -> a TransportLink (a ProgressLink to receive in rounds)


@dataclass(eq=False)
class Item:
    """One multimodal item: in flight, then ready (``embeddings``), delivered (every worker loaded it) or failed."""

    mm_hash: str
    room: Room
    num_embeds: int
    requests: set[str] = field(default_factory=set)  # the live requests that need it
    embeddings: torch.Tensor | None = None
    delivered: bool = False
    error: ReceiverError | None = None

    @property
    def in_flight(self) -> bool:
        return self.embeddings is None and not self.delivered and self.error is None


class ReceiveScheduler:
    """The controller's queue and the item table behind the scheduler-side connector's calls."""

    def __init__(
        self,
        config: ConsumerConfig,
        link_factory: LinkFactory,
        *,
        clock: Clock | None = None,
        metrics: ReceiverMetrics | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        # No payload arena: an assembled item's memory is handed on to the encoder cache and never reused here.
        self.buffers = TorchBlockBuffers(config.num_blocks, config.block_size, config.hidden_size)
        self.allocator = OwningBlockAllocator(config.num_blocks, config.block_size)
        self.queue: ReceiverQueue[EmbeddingPayload] = ReceiverQueue(
            self.buffers, self.allocator, config.receiver, clock=clock, metrics=metrics
        )
        self._metrics = metrics
        self._link_factory = link_factory
        self._items: dict[str, Item] = {}
        self._by_room: dict[Room, Item] = {}  # items the controller has not ended yet, orphans included
        self._loads: dict[str, torch.Tensor] = {}
        self._unavailable: set[str] = set()

    # ---- vLLM's scheduler-side calls -------------------------------------------------------------

    def has_cache_item(self, mm_hash: str) -> bool:
        item = self._items.get(mm_hash)
        return item is not None and item.embeddings is not None

    def ensure_cache_available(self, request: Any, num_computed_tokens: int) -> bool:
        """Start every item the request still needs; True only when none of them is in flight or failed."""
        available = True
        for feature in request.mm_features or ():
            position = feature.mm_position
            if position.offset + position.length <= num_computed_tokens:
                continue  # already in the KV cache: its embeddings are not needed again
            item = self._items.get(feature.identifier) or self._start(feature.identifier, position.get_num_embeds())
            if item is None:  # its room still fences blocks of an earlier fetch of the same item
                available = False
                continue
            item.requests.add(request.request_id)
            if item.error is not None:
                self._unavailable.add(request.request_id)
                available = False
            elif item.in_flight:
                available = False
        return available

    def update_state_after_alloc(self, request: Any, index: int) -> None:
        """vLLM allocated the item's encoder cache entry because ``has_cache_item`` said True: load it."""
        item = self._items.get(request.mm_features[index].identifier)
        if item is not None and item.embeddings is not None:
            self._loads[item.mm_hash] = item.embeddings

    def build_connector_meta(self, scheduler_output: Any) -> LoadMetadata:
        """One controller step, then this step's loads for every worker (the per-step state resets)."""
        self._step()
        loads, self._loads = self._loads, {}
        return LoadMetadata(loads)

    def update_connector_output(self, loaded: LoadedMetadata | None) -> None:
        """Every worker must have loaded every item sent; an item that some did not fails its requests."""
        if loaded is None:
            return
        for mm_hash, workers in loaded.loaded.items():
            item = self._items.get(mm_hash)
            if item is None:
                continue
            if workers == self.config.workers:
                item.embeddings, item.delivered = None, True
                continue
            logger.error("item %s was loaded by %d of %d workers", mm_hash, workers, self.config.workers)
            if self._metrics is not None:
                self._metrics.rank_disagreement("load")
            item.embeddings = None
            item.error = RankDisagreement(item.room, f"loaded by {workers} of {self.config.workers} workers")
            self._unavailable |= item.requests

    def take_unavailable_requests(self) -> set[str]:
        unavailable, self._unavailable = self._unavailable, set()
        return unavailable

    def update_state_after_free(self, request: Any, index: int) -> None:
        """The input is in the KV cache: this request needs the item no more."""
        self._let_go(request.request_id, request.mm_features[index].identifier)

    def request_finished(self, request: Any) -> tuple[bool, dict[str, Any] | None]:
        """Nothing of vLLM's memory is ours to delay; an item only this request wanted is aborted (fenced)."""
        for feature in request.mm_features or ():
            self._let_go(request.request_id, feature.identifier)
        self._unavailable.discard(request.request_id)
        return False, None

    def has_pending_push_work(self) -> bool:
        """The controller holds a request (in flight, or fencing blocks): keep stepping."""
        return len(self.queue) > 0 or bool(self.queue.fenced_rooms)

    # ---- the items -------------------------------------------------------------------------------

    def item(self, mm_hash: str) -> Item | None:
        return self._items.get(mm_hash)

    def _start(self, mm_hash: str, num_embeds: int) -> Item | None:
        """A new room for the item; None while its room is still in the controller (an earlier fetch fences)."""
        room = room_of(mm_hash)
        if self.queue.get(room) is not None:
            return None
        item = Item(mm_hash, room, num_embeds)
        self._items[mm_hash] = item
        try:
            link = self._link_factory(LinkRequest(room, mm_hash, num_embeds, self.buffers, self.config.extra))
        except Exception as error:  # no producer to ask (bootstrap, socket): the item fails, vLLM goes on
            logger.error("no link for item %s: %r", mm_hash, error)
            item.error = TransportFailed(room, f"building the link raised {error!r}")
            return item
        self.queue.add(room, link)
        self._by_room[room] = item
        return item

    def _let_go(self, request_id: str, mm_hash: str) -> None:
        item = self._items.get(mm_hash)
        if item is None:
            return
        item.requests.discard(request_id)
        if item.requests:
            return
        del self._items[mm_hash]  # a later request for the same hash starts a new room
        if item.in_flight:
            self.queue.abort(item.room)

    def _step(self) -> None:
        for request in self.queue.step():
            item = self._by_room.pop(request.room)
            error = self._finish(request, item)
            if self._items.get(item.mm_hash) is not item:
                continue  # nobody wants it any more
            if error is not None:
                item.error = error
                self._unavailable |= item.requests

    def _finish(self, request: ReceiverRequest[EmbeddingPayload], item: Item) -> ReceiverError | None:
        if request.state is not State.SUCCESS:
            assert request.error is not None
            return request.error
        payload = request.payload
        self.queue.release(request.room)  # the payload is a copy: the blocks go back now
        assert payload is not None
        if payload.total_tokens != item.num_embeds:
            return SizeMismatch(
                item.room, f"vLLM counts {item.num_embeds} embeddings for {item.mm_hash}, the producer sent "
                f"{payload.total_tokens}",
            )  # fmt: skip
        item.embeddings = payload.embeddings
        return None
