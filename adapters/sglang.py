"""A drop-in for SGLang's Language-side multimodal queues, built on the receiver controller.

SGLang's scheduler runs, once per iteration, ``prealloc_queue.pop_preallocated()`` → ``transfer_queue.extend``
→ ``transfer_queue.pop_transferred()`` → ``waiting_queue.extend``. This module offers the same two queues, so
that loop keeps its shape while the controller decides every read, allocation and resume. SGLang itself is
not imported: the bridge only relies on the interfaces that loop already uses.

- a receiver with ``poll()``, ``init(embedding_indices, allocated_tokens)``,
  ``resume_transfer(embedding_indices, sent_tokens, allocated_tokens)``, ``failure_exception()`` and
  ``abort()`` (a Mooncake embedding receiver, or the fake one of warm-up requests) becomes a ``TransportLink``;
- the pool is ``TorchBlockBuffers``, whose ``get_buf_infos()`` lists pointers and lengths in the original
  order, so a sender written for the original buffers writes into ours unchanged;
- a finished request leaves with ``origin_input_ids``, ``input_embeds`` and, for a multimodal prompt, the
  M-RoPE positions and delta, classified by the Language side's own prompt length taken *before* it is
  overwritten with the expanded ids (taking it after made every image prompt look text-only).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from epd_receiver.fsm import (
    KVPoll,
    RankGroup,
    ReceiverConfig,
    ReceiverError,
    ReceiverQueue,
    ReceiverRequest,
    Room,
    SizeMismatch,
    State,
)
from epd_receiver.fsm.ports import Clock

from .allocator import OwningBlockAllocator
from .buffers import TorchBlockBuffers
from .payload import EmbeddingPayload, PayloadArena

__all__ = [
    "FAKE_BOOTSTRAP_HOST",
    "BridgeConfig",
    "EmbeddingBridge",
    "EmbeddingReceiver",
    "KVPoll",
    "LanguageReq",
    "MultimodalPositions",
    "PreallocQueue",
    "PromptKind",
    "ReceiverLink",
    "TransferQueue",
    "classify",
]

FAKE_BOOTSTRAP_HOST = "2.2.2.2"  # SGLang marks warm-up (health) requests with this bootstrap host

_PREALLOC_STATES = (State.BOOTSTRAPPING, State.WAITING_FOR_INPUT)


class EmbeddingReceiver(Protocol):
    """The Language-side receiver interface of SGLang's embedding transfer (Mooncake or fake)."""

    def poll(self) -> int: ...

    def init(self, embedding_indices: list[int] | None = None, allocated_tokens: int | None = None) -> None: ...

    def resume_transfer(self, embedding_indices: list[int], sent_tokens: int, allocated_tokens: int) -> None: ...

    def failure_exception(self) -> BaseException | None:
        """SGLang's raises the transfer error (after clearing the room's state); either way it explains Failed."""
        ...

    def abort(self) -> None: ...


class LanguageReq(Protocol):
    """The parts of SGLang's ``Req`` the bridge reads and writes."""

    bootstrap_room: int
    origin_input_ids: list[int]
    input_embeds: Any
    multimodal_inputs: Any


class ReceiverLink:
    """The controller's ``TransportLink`` over an SGLang receiver: same calls, keyword names as SGLang's."""

    __slots__ = ("receiver",)

    def __init__(self, receiver: EmbeddingReceiver) -> None:
        self.receiver = receiver

    def poll(self) -> int:
        return int(self.receiver.poll())

    def init(self, blocks: Sequence[int], allocated_tokens: int) -> None:
        self.receiver.init(embedding_indices=list(blocks), allocated_tokens=allocated_tokens)

    def resume(self, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None:
        self.receiver.resume_transfer(
            embedding_indices=list(blocks), sent_tokens=sent_tokens, allocated_tokens=allocated_tokens
        )

    def abort(self) -> None:
        self.receiver.abort()

    def failure_reason(self) -> str | None:
        """SGLang's ``failure_exception()`` raises the error rather than returning it; both are accepted."""
        try:
            error = self.receiver.failure_exception()
        except Exception as raised:
            return str(raised)
        return None if error is None else str(error)


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


@dataclass(slots=True)
class MultimodalPositions:
    """What a multimodal prompt carries into prefill besides its embeddings (SGLang's ``MultimodalInputs``)."""

    mrope_positions: torch.Tensor  # (3, T) int32
    mrope_position_delta: torch.Tensor  # (1, 1), as SGLang shapes it


MultimodalInputsFactory = Callable[[torch.Tensor, torch.Tensor], Any]


def _positions(mrope_positions: torch.Tensor, delta: torch.Tensor) -> MultimodalPositions:
    return MultimodalPositions(mrope_positions, delta)


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


class EmbeddingBridge:
    """One receive pool, one controller queue, and SGLang's two queue facades over them."""

    def __init__(
        self,
        config: BridgeConfig,
        receiver_factory: Callable[[Any], EmbeddingReceiver],
        *,
        receiver_config: ReceiverConfig | None = None,
        ranks: RankGroup | None = None,
        clock: Clock | None = None,
        multimodal_inputs: MultimodalInputsFactory = _positions,
        buffers: TorchBlockBuffers | None = None,
    ) -> None:
        self.config = config
        # Payloads come from an arena of warm memory: writing into fresh memory is several times slower.
        self.buffers = buffers or TorchBlockBuffers(
            config.num_blocks,
            config.block_size,
            config.hidden_size,
            config.deepstack_layers,
            arena=PayloadArena(config.hidden_size, config.deepstack_layers),
        )
        self.allocator = OwningBlockAllocator(config.num_blocks, config.block_size)
        receiver_config = receiver_config or ReceiverConfig(default_alloc_tokens=config.default_allocate_tokens)
        self.queue: ReceiverQueue[EmbeddingPayload] = ReceiverQueue(
            self.buffers, self.allocator, receiver_config, ranks=ranks, clock=clock
        )
        self._receiver_factory = receiver_factory
        self._multimodal_inputs = multimodal_inputs
        self._reqs: dict[Room, Any] = {}
        self._payloads: dict[Room, EmbeddingPayload] = {}
        self.prealloc_queue = PreallocQueue(self)
        self.transfer_queue = TransferQueue(self)

    def get_buf_infos(self) -> tuple[list[int], list[int], list[int]]:
        """What the transfer engine registers and the sender addresses (SGLang's order, deepstack last)."""
        return self.buffers.get_buf_infos()

    def admit(self, req: Any) -> None:
        room = int(req.bootstrap_room)
        self.queue.add(room, ReceiverLink(self._receiver_factory(req)), warmup=is_fake(req))
        self._reqs[room] = req

    def abort(self, req: Any) -> bool:
        """The client gave up: the request fails (the sender is told) and comes out of ``pop_failed``."""
        return bool(self.queue.abort(int(req.bootstrap_room)))

    def release(self, req: Any) -> None:
        """The request's prefill is done (SGLang's ``free_with_req``): its payload memory may be reused."""
        payload = self._payloads.pop(int(req.bootstrap_room), None)
        if payload is not None:
            self.buffers.recycle(payload)

    def finish(self, ended: Iterable[ReceiverRequest[EmbeddingPayload]]) -> tuple[list[Any], list[tuple[Any, Any]]]:
        """Turn the controller's ended requests into SGLang requests ready for prefill, or failures."""
        ready: list[Any] = []
        failed: list[tuple[Any, ReceiverError]] = []
        for request in ended:
            req = self._reqs.pop(request.room)
            if request.state is State.SUCCESS:
                error = self._deliver(request, req)
                if error is None:
                    ready.append(req)
                else:
                    failed.append((req, error))
            else:
                assert request.error is not None
                self._drop(request.payload)
                failed.append((req, request.error))
        return ready, failed

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
            delta = torch.tensor([[payload.mrope_delta]], dtype=torch.int64)
            req.multimodal_inputs = self._multimodal_inputs(payload.mrope_positions, delta)
        self._payloads[request.room] = payload
        return None

    def _drop(self, payload: EmbeddingPayload | None) -> None:
        if payload is not None:
            self.buffers.recycle(payload)


class PreallocQueue:
    """SGLang's prealloc queue: requests wait here for the handshake and their first allocation."""

    def __init__(self, bridge: EmbeddingBridge) -> None:
        self._bridge = bridge
        self.queue: list[Any] = []

    def add(self, req: Any) -> None:
        self._bridge.admit(req)
        self.queue.append(req)

    def extend(self, reqs: Iterable[Any]) -> None:
        for req in reqs:
            self.add(req)

    def pop_preallocated(self) -> list[Any]:
        """The requests whose first allocation was granted and init sent (in the controller's last step)."""
        moved: list[Any] = []
        kept: list[Any] = []
        for req in self.queue:
            request = self._bridge.queue.get(int(req.bootstrap_room))
            (kept if request is not None and request.state in _PREALLOC_STATES else moved).append(req)
        self.queue = kept
        return moved

    def __len__(self) -> int:
        return len(self.queue)


class TransferQueue:
    """SGLang's transfer queue: ``pop_transferred`` runs one controller step and returns what is ready."""

    def __init__(self, bridge: EmbeddingBridge) -> None:
        self._bridge = bridge
        self.queue: list[Any] = []
        self._failed: list[tuple[Any, ReceiverError]] = []

    def extend(self, reqs: Iterable[Any]) -> None:
        self.queue.extend(reqs)

    def pop_transferred(self) -> list[Any]:
        """One scheduler iteration of the controller; successful requests come back ready for prefill."""
        ready, failed = self._bridge.finish(self._bridge.queue.step())
        self._failed.extend(failed)
        gone = {id(req) for req in ready} | {id(req) for req, _ in failed}
        self.queue = [req for req in self.queue if id(req) not in gone]
        if failed:
            prealloc = self._bridge.prealloc_queue
            prealloc.queue = [req for req in prealloc.queue if id(req) not in gone]
        return ready

    def pop_failed(self) -> list[tuple[Any, ReceiverError]]:
        """Requests that ended FAILED since the last call, with the typed error to abort them with."""
        failed, self._failed = self._failed, []
        return failed

    def __len__(self) -> int:
        return len(self.queue)
