"""SGLang's Language-side multimodal queues, rebuilt over the receiver controller.

The fork's scheduler runs, once per iteration, ``prealloc_queue.pop_preallocated()`` → ``transfer_queue.extend``
→ ``transfer_queue.pop_transferred()`` → ``waiting_queue.extend``, and reaches into the queues elsewhere:
its abort handler calls ``entry.embedding_receiver.abort()`` on every entry of both queues, its load report
reads ``entry.req.origin_input_ids`` on prealloc entries, and after a prefill it hands every request to
``req_to_metadata_buffer_idx_allocator.free_with_req(req)``. This module offers objects of exactly those
shapes, so the loop keeps its code while the controller decides every read, allocation, resume and fence.
SGLang itself is not imported.

One controller step runs per iteration, inside ``pop_transferred()``. Every request that ended in it comes
out there: a successful one ready for prefill, a failed one reported through the ``on_failed`` hook (SGLang:
``prepare_abort`` then ``stream_output``) in the same call, as the fork reports its own failures there.
A failed request's per-room state in the transport (the fork's status entry and failure record) is cleared
only once the controller has retired it, in the step its fence lifts (or at once when it fenced nothing):
until then that status is the evidence the fence waits for.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from epd_receiver.adapters.integrations.sglang.link import LinkFactory, ReceiverLink
from epd_receiver.adapters.integrations.sglang.mm import (
    MultimodalInputsFactory,
    multimodal_inputs_like_sglang,
    position_delta,
)
from epd_receiver.adapters.ports.allocator import OwningBlockAllocator
from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.payload import EmbeddingPayload, PayloadArena
from epd_receiver.fsm import (
    RankGroup,
    ReceiverConfig,
    ReceiverError,
    ReceiverQueue,
    ReceiverRequest,
    Room,
    SizeMismatch,
    State,
    TransportFailed,
)
from epd_receiver.fsm.ports import Clock, ReceiverMetrics

__all__ = [
    "FAKE_BOOTSTRAP_HOST",
    "BridgeConfig",
    "EmbeddingBridge",
    "LanguageEntry",
    "PayloadReleaser",
    "PreallocQueue",
    "PromptKind",
    "TransferQueue",
    "classify",
]

logger = logging.getLogger(__name__)

FAKE_BOOTSTRAP_HOST = "2.2.2.2"  # SGLang marks warm-up (health) requests with this bootstrap host

_PREALLOC_STATES = frozenset({State.BOOTSTRAPPING, State.WAITING_FOR_INPUT})

ReceiverFactory = Callable[[Any], Any]  # req -> an SGLang receiver
FailureHook = Callable[[Any, ReceiverError], None]  # (req, typed error): answer the client


class PromptKind(enum.Enum):
    TEXT_ONLY = "text-only"
    MULTIMODAL = "multimodal"
    MISMATCH = "failed"


def classify(own_length: int, total_tokens: int) -> PromptKind:
    """The Language side's own (unexpanded) length against the sender's T: equal, shorter, or impossible."""
    if own_length == total_tokens:
        return PromptKind.TEXT_ONLY
    if own_length < total_tokens:
        return PromptKind.MULTIMODAL
    return PromptKind.MISMATCH


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """The pool geometry; ``from_env`` reads the same variables SGLang's scheduler reads."""

    hidden_size: int
    num_blocks: int = 64
    block_size: int = 8192
    default_allocate_tokens: int = 8192
    deepstack_layers: int = 0

    @classmethod
    def from_env(
        cls, hidden_size: int, deepstack_layers: int = 0, environ: Mapping[str, str] | None = None
    ) -> BridgeConfig:
        env = os.environ if environ is None else environ
        return cls(
            hidden_size=hidden_size,
            num_blocks=int(env.get("SGLANG_EMBEDDING_CACHE_BUFFER_SIZE", "64")),
            block_size=int(env.get("SGLANG_EMBEDDING_CACHE_BLOCK_SIZE", "8192")),
            default_allocate_tokens=int(env.get("SGLANG_EMBEDDING_DEFAULT_ALLOCATE_BUFFER_SIZE", "8192")),
            deepstack_layers=deepstack_layers,
        )


def is_fake(req: object) -> bool:
    return getattr(req, "bootstrap_host", None) == FAKE_BOOTSTRAP_HOST


class BridgedReceiver:
    """What a queue entry offers as ``embedding_receiver``: SGLang's receiver, with ``abort()`` routed
    through the controller, so that the request fails Aborted and its blocks are fenced while the sender
    may write. Every other attribute is the receiver's own."""

    def __init__(self, bridge: EmbeddingBridge, room: Room, receiver: Any) -> None:
        self._bridge = bridge
        self._room = room
        self.receiver = receiver

    def abort(self) -> None:
        self._bridge.abort_room(self._room)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.receiver, name)


@dataclass(eq=False)
class LanguageEntry:
    """A queue entry shaped as the fork's ``MultimodalLanguageRequest`` (multimodal_language.py:53-66)."""

    req: Any
    embedding_receiver: Any
    waiting_for_input: bool = False
    embedding_indices: list[int] | None = None  # the blocks the request holds now (or fences, once failed)


class PayloadReleaser:
    """What the scheduler installs as ``req_to_metadata_buffer_idx_allocator``: SGLang calls its
    ``free_with_req(req)`` after every prefill (and on a waiting request's abort), for every request."""

    def __init__(self, bridge: EmbeddingBridge) -> None:
        self._bridge = bridge

    def free_with_req(self, req: Any) -> None:
        self._bridge.release(req)

    def available_size(self) -> int:
        """Free pool blocks, as SGLang's allocator reports them."""
        return self._bridge.allocator.free_count


class EmbeddingBridge:
    """One receive pool, one controller queue, and SGLang's two queue facades over them."""

    def __init__(
        self,
        config: BridgeConfig,
        receiver_factory: ReceiverFactory | None = None,
        *,
        on_failed: FailureHook | None = None,
        receiver_config: ReceiverConfig | None = None,
        ranks: RankGroup | None = None,
        clock: Clock | None = None,
        multimodal_inputs: MultimodalInputsFactory = multimodal_inputs_like_sglang,
        link_factory: LinkFactory = ReceiverLink,
        metrics: ReceiverMetrics | None = None,
    ) -> None:
        self.config = config
        # Payloads come from an arena of warm memory: writing into fresh memory is several times slower.
        arena = PayloadArena(config.hidden_size, config.deepstack_layers)
        self.buffers = TorchBlockBuffers(
            config.num_blocks, config.block_size, config.hidden_size, config.deepstack_layers, arena=arena
        )
        self.allocator = OwningBlockAllocator(config.num_blocks, config.block_size)
        receiver_config = receiver_config or ReceiverConfig(default_alloc_tokens=config.default_allocate_tokens)
        self.queue: ReceiverQueue[EmbeddingPayload] = ReceiverQueue(
            self.buffers, self.allocator, receiver_config, ranks=ranks, clock=clock, metrics=metrics
        )
        self.receiver_factory = receiver_factory
        self.on_failed = on_failed
        self._multimodal_inputs = multimodal_inputs
        self._link_factory = link_factory
        self._entries: dict[Room, LanguageEntry] = {}
        self._rejected: list[tuple[LanguageEntry, ReceiverError]] = []
        self._payloads: dict[Room, tuple[Any, EmbeddingPayload]] = {}
        self._failed_links: dict[Room, Any] = {}  # failed requests not yet retired by the controller
        self.releaser = PayloadReleaser(self)
        self.prealloc_queue = PreallocQueue(self)
        self.transfer_queue = TransferQueue(self)

    @property
    def arena(self) -> PayloadArena:
        assert self.buffers.arena is not None
        return self.buffers.arena

    def get_buf_infos(self) -> tuple[list[int], list[int], list[int]]:
        """What the transfer engine registers and the sender addresses (SGLang's order, deepstack last)."""
        return self.buffers.get_buf_infos()

    # ---- admission, abort, release ---------------------------------------------------------------

    def admit(self, req: Any) -> LanguageEntry:
        """Build the request's receiver and link; a receiver that cannot be built fails the request."""
        room = int(req.bootstrap_room)
        if self.receiver_factory is None:
            raise RuntimeError("the bridge has no receiver factory yet: connect the transport first")
        if room in self._entries or self.queue.get(room) is not None:
            # Checked before the receiver exists: building one would touch the other request's status.
            return self._reject(req, TransportFailed(room, "another request in flight has this room"))
        try:
            receiver = self.receiver_factory(req)
        except Exception as error:
            return self._reject(req, TransportFailed(room, f"building the receiver raised {error!r}"))
        entry = LanguageEntry(req, BridgedReceiver(self, room, receiver))
        link = self._link_factory(receiver, room=room, writes_nothing=is_fake(req))
        self.queue.add(room, link, warmup=is_fake(req))
        self._entries[room] = entry
        return entry

    def _reject(self, req: Any, error: ReceiverError) -> LanguageEntry:
        """An entry without a receiver (nothing to abort), failed at the next ``pop_transferred``."""
        entry = LanguageEntry(req, None)
        self._rejected.append((entry, error))
        return entry

    def abort_room(self, room: Room) -> bool:
        """The client gave up: the request fails Aborted (the sender is told); reported by ``pop_transferred``."""
        return bool(self.queue.abort(room))

    def abort(self, req: Any) -> bool:
        return self.abort_room(int(req.bootstrap_room))

    def release(self, req: Any) -> None:
        """The request's prefill is done (SGLang's ``free_with_req``): its payload may be reused once no
        tensor views it any more. Idempotent; a request the bridge holds nothing for is a no-op."""
        room = getattr(req, "bootstrap_room", None)
        held = self._payloads.get(room) if isinstance(room, int) else None
        if held is None or held[0] is not req:
            logger.debug("free_with_req: nothing held for rid=%s room=%s", getattr(req, "rid", None), room)
            return
        del self._payloads[room]
        self.buffers.recycle(held[1])

    @property
    def held_payloads(self) -> int:
        """Payloads delivered and not yet released."""
        return len(self._payloads)

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet reported."""
        return len(self._entries) + len(self._rejected)

    # ---- one scheduler iteration -----------------------------------------------------------------

    def step(self) -> list[Any]:
        """Run the controller once; report every failure through ``on_failed``; return what is ready."""
        ended = self.queue.step()
        failed, self._rejected = self._rejected, []
        ready: list[Any] = []
        for request in ended:
            entry = self._entries.pop(request.room)
            error = self._finish(request, entry.req)
            if error is None:
                ready.append(entry.req)
            else:
                failed.append((entry, error))
                self._failed_links[request.room] = request.link
        for entry, error in failed:
            self._report(entry.req, error)
        gone = {id(r) for r in ready} | {id(entry.req) for entry, _ in failed}
        self.prealloc_queue.forget(gone)
        self.transfer_queue.forget(gone)
        self._forget_retired()
        self._note_blocks()
        return ready

    def _forget_retired(self) -> None:
        """Failed requests the controller retired in this step: clear their state in the transport."""
        for room in [room for room in self._failed_links if self.queue.get(room) is None]:
            forget = getattr(self._failed_links.pop(room), "forget", None)
            if forget is not None:
                forget()

    def _finish(self, request: ReceiverRequest[EmbeddingPayload], req: Any) -> ReceiverError | None:
        if request.state is not State.SUCCESS:
            assert request.error is not None
            self._drop(request.payload)
            return request.error
        return self._deliver(request, req)

    def _deliver(self, request: ReceiverRequest[EmbeddingPayload], req: Any) -> ReceiverError | None:
        """Hand the payload to ``req``; the pool blocks go back at once, since the payload is a copy."""
        payload = request.payload
        self.queue.release(request.room)
        if payload is None:  # a warm-up request: nothing was transferred, it passes through as it is
            return None
        own_length = len(req.origin_input_ids)  # before it is overwritten below
        kind = classify(own_length, payload.total_tokens)
        if kind is PromptKind.MISMATCH:
            self._drop(payload)
            return SizeMismatch(
                request.room, f"the prompt has {own_length} tokens, the sender's expansion only {payload.total_tokens}"
            )
        req.origin_input_ids = payload.fill_ids.tolist()
        req.input_embeds = payload.input_embeds()
        req.multimodal_inputs = None
        if kind is PromptKind.MULTIMODAL:
            delta = position_delta(payload.mrope_delta)
            req.multimodal_inputs = self._multimodal_inputs(payload.mrope_positions, delta)
        req.embedding_indices = []  # the pool blocks are already back; free_with_req gives the payload back
        self._payloads[request.room] = (req, payload)
        return None

    def _report(self, req: Any, error: ReceiverError) -> None:
        if self.on_failed is None:
            logger.error("embedding transfer failed for rid=%s: %s", getattr(req, "rid", None), error)
            return
        self.on_failed(req, error)

    def _drop(self, payload: EmbeddingPayload | None) -> None:
        if payload is not None:
            self.buffers.recycle(payload)

    def _note_blocks(self) -> None:
        """Keep each live entry's ``embedding_indices`` and ``waiting_for_input`` as the fork keeps them."""
        for room, entry in self._entries.items():
            request = self.queue.get(room)
            if request is not None:
                entry.embedding_indices = list(request.blocks or request.fenced) or None
                entry.waiting_for_input = request.state is not State.BOOTSTRAPPING

    def entry_state(self, entry: LanguageEntry) -> State | None:
        request = self.queue.get(int(entry.req.bootstrap_room))
        return None if request is None else request.state


class PreallocQueue:
    """SGLang's prealloc queue: requests wait here for the handshake and their first allocation."""

    def __init__(self, bridge: EmbeddingBridge) -> None:
        self._bridge = bridge
        self.queue: list[LanguageEntry] = []

    def add(self, req: Any) -> None:
        self.queue.append(self._bridge.admit(req))

    def extend(self, reqs: Iterable[Any]) -> None:
        for req in reqs:
            self.add(req)

    def pop_preallocated(self) -> list[LanguageEntry]:
        """The entries whose first allocation was granted and init sent (in the controller's last step)."""
        moved: list[LanguageEntry] = []
        kept: list[LanguageEntry] = []
        for entry in self.queue:
            state = self._bridge.entry_state(entry)
            (kept if state is None or state in _PREALLOC_STATES else moved).append(entry)
        self.queue = kept
        return moved

    def forget(self, reqs: set[int]) -> None:
        self.queue = [entry for entry in self.queue if id(entry.req) not in reqs]

    def __len__(self) -> int:
        return len(self.queue)


class TransferQueue:
    """SGLang's transfer queue: ``pop_transferred`` runs one controller step and returns what is ready."""

    def __init__(self, bridge: EmbeddingBridge) -> None:
        self._bridge = bridge
        self.queue: list[LanguageEntry] = []

    def add(self, entry: LanguageEntry) -> None:
        self.queue.append(entry)

    def extend(self, entries: Iterable[LanguageEntry]) -> None:
        self.queue.extend(entries)

    def pop_transferred(self) -> list[Any]:
        """One scheduler iteration of the controller: failures are reported through the bridge's hook
        here, and the successful requests come back ready for prefill."""
        return self._bridge.step()

    def forget(self, reqs: set[int]) -> None:
        self.queue = [entry for entry in self.queue if id(entry.req) not in reqs]

    def __len__(self) -> int:
        return len(self.queue)
