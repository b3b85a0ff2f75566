"""Fakes of the SGLang fork's Language-side scheduler: ZhengWG/sglang, branch vl-dis-1030, commit cca20b0.

The request (``Req``), its multimodal inputs, ``prepare_abort``, and the parts of the scheduler that meet
the Language-side queues: the loop that moves requests through them, the abort handler, the load report
and the prefill that reads what a delivered request carries. The receiver and its manager are in
``sglang_fork_receiver.py``, the Encode side in ``sglang_fork_encode.py``.

Paths in the docstrings are under ``python/sglang/srt/``. Each fake reproduces what the cited lines do; the
fakes also keep logs the fork does not (``streamed``, ``aborted_outputs``), for the tests to judge by; no
fake reads its own log to decide anything.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

FAKE_BOOTSTRAP_HOST = "2.2.2.2"  # disaggregation/utils.py, FAKE_BOOTSTRAP_HOST


# ---- managers/schedule_batch.py and disaggregation/utils.py ------------------------------------------


class FinishAbort:
    """``FINISH_ABORT`` (managers/schedule_batch.py:156-169): why an aborted request finished."""

    def __init__(self, message: str | None = None, status_code: int | None = None, err_type: Any = None) -> None:
        self.message = message or "Aborted"
        self.status_code = status_code
        self.err_type = err_type


def prepare_abort(req: Req, error_message: str, status_code: int | None = None) -> None:
    """``prepare_abort`` (disaggregation/utils.py:482-495): the finish reason, and empty input logprobs."""
    req.finished_reason = FinishAbort(error_message, status_code)
    if req.return_logprob:
        req.input_token_logprobs_val = []
        req.input_token_logprobs_idx = []


class Modality(enum.Enum):
    """``Modality`` (managers/schedule_batch.py:172-190), the members the Language side names."""

    IMAGE = enum.auto()
    MULTI_IMAGES = enum.auto()
    VIDEO = enum.auto()
    AUDIO = enum.auto()


@dataclass
class MultimodalDataItem:
    """``MultimodalDataItem`` (managers/schedule_batch.py:192-215): a modality, optional features, and
    model-specific data readable as attributes."""

    modality: Modality
    hash: int | None = None
    pad_value: int | None = None
    offsets: list[Any] | None = None
    feature: Any = None
    precomputed_embeddings: Any = None
    model_specific_data: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        data = self.__dict__.get("model_specific_data", {})
        if name in data:
            return data[name]
        raise AttributeError(name)


@dataclass
class MultimodalInputs:
    """``MultimodalInputs`` (managers/schedule_batch.py:293-320): the items, and the M-RoPE fields."""

    mm_items: list[MultimodalDataItem]
    mrope_positions: torch.Tensor | None = None
    mrope_position_delta: torch.Tensor | None = None


@dataclass(eq=False)
class Req:
    """The fields of ``Req`` (managers/schedule_batch.py:433-675) the Language side reads and writes;
    ``embedding_indices`` defaults to an empty list (:675), so ``free_with_req`` is called for every one."""

    rid: str
    origin_input_ids: list[int]
    bootstrap_host: str = "10.0.0.1"
    bootstrap_room: int = 0
    data_parallel_rank: int | None = None
    return_logprob: bool = False
    input_embeds: Any = None
    multimodal_inputs: Any = None
    finished_reason: Any = None
    embedding_indices: list[int] = field(default_factory=list)
    prefix_indices: list[int] = field(default_factory=list)

    @property
    def fill_ids(self) -> list[int]:
        return self.origin_input_ids


# ---- managers/scheduler.py and friends: the Language-side scheduler --------------------------------


class LanguageScheduler:
    """The parts of the fork's ``Scheduler`` in Language mode that meet the Language-side queues.

    Requests enter the prealloc queue (managers/scheduler.py:1540-1541); ``process_multimodal_language_queue``
    is the fork's, line for line (disaggregation/multimodal_language.py:568-572); ``abort_request`` is its
    waiting-queue part (managers/scheduler.py:2555-2585, ``free_with_req`` when ``embedding_indices`` is not
    None) and its Language part (:2642-2656, ``abort()`` on every entry of both queues that has one);
    ``load_tokens`` is its load report (:2438-2455, ``req.req.origin_input_ids`` on prealloc entries);
    ``run_prefill`` takes every waiting request into one extend batch (managers/schedule_batch.py:1260-1290,
    1372-1393: each ``input_embeds`` sliced by the prompt, each ``mm_items`` iterated)
    and frees after it (managers/scheduler_output_processor_mixin.py:140-146).
    """

    def __init__(self, hidden_size: int, deepstack_layers: int = 0, attn_tp_cpu_group: Any = None) -> None:
        vision = SimpleNamespace(deepstack_visual_indexes=list(range(deepstack_layers)))
        self.model_config = SimpleNamespace(hidden_size=hidden_size, hf_config=SimpleNamespace(vision_config=vision))
        self.attn_tp_cpu_group = attn_tp_cpu_group
        self.tp_rank = 0
        self.enable_metrics = False
        self.waiting_queue: list[Req] = []
        self.streamed: list[Req] = []  # every request stream_output answered
        self.aborted_outputs: list[str] = []  # rids answered with AbortReq from the waiting queue
        self.batches: list[SimpleNamespace] = []
        # set by the Language branch of the constructor (managers/scheduler.py:987-1022), or by install()
        self.disagg_language_prealloc_queue: Any = None
        self.disagg_language_transfer_queue: Any = None
        self.req_to_metadata_buffer_idx_allocator: Any = None
        self.disagg_metadata_buffers: Any = None

    def process_input_requests(self, reqs: list[Req]) -> None:
        for req in reqs:
            self.disagg_language_prealloc_queue.add(req)

    def process_multimodal_language_queue(self) -> None:
        req_conns = self.disagg_language_prealloc_queue.pop_preallocated()
        self.disagg_language_transfer_queue.extend(req_conns)
        alloc_reqs = self.disagg_language_transfer_queue.pop_transferred()
        self.waiting_queue.extend(alloc_reqs)

    def stream_output(self, reqs: list[Req], return_logprob: bool) -> None:
        self.streamed.extend(reqs)

    def abort_request(self, rid: str) -> None:
        for i in reversed([i for i, req in enumerate(self.waiting_queue) if req.rid.startswith(rid)]):
            req = self.waiting_queue.pop(i)
            self.aborted_outputs.append(req.rid)
            if req.embedding_indices is not None:
                self.req_to_metadata_buffer_idx_allocator.free_with_req(req)
        for language_req in self.disagg_language_prealloc_queue.queue:
            if language_req.req.rid.startswith(rid) and hasattr(language_req.embedding_receiver, "abort"):
                language_req.embedding_receiver.abort()
        for language_req in self.disagg_language_transfer_queue.queue:
            if language_req.req.rid.startswith(rid) and hasattr(language_req.embedding_receiver, "abort"):
                language_req.embedding_receiver.abort()

    def load_tokens(self) -> int:
        tokens = sum(len(req.origin_input_ids) for req in self.waiting_queue)
        return tokens + sum(len(entry.req.origin_input_ids) for entry in self.disagg_language_prealloc_queue.queue)

    def run_prefill(self, on_batch: Callable[[SimpleNamespace], None] | None = None) -> list[Req]:
        """One extend batch of every waiting request, then the free path of a finished prefill."""
        reqs, self.waiting_queue = self.waiting_queue, []
        if not reqs:
            return []
        batch = _prepare_for_extend(reqs)
        if on_batch is not None:
            on_batch(batch)
        for req in reqs:
            if req.embedding_indices is not None:
                self.req_to_metadata_buffer_idx_allocator.free_with_req(req)
        return reqs


def _prepare_for_extend(reqs: list[Req]) -> SimpleNamespace:
    """managers/schedule_batch.py:1260-1290 and 1372-1393, on CPU: the embeddings of the batch (sliced from
    each request's ``input_embeds``) and every multimodal input's items visited."""
    input_embeds: Any = []
    multimodal_inputs = []
    for req in reqs:
        if req.input_embeds is not None:
            chunk = req.input_embeds[len(req.prefix_indices) : len(req.fill_ids)]
            input_embeds = chunk if isinstance(input_embeds, list) else torch.cat([input_embeds, chunk], dim=0)
        multimodal_inputs.append(req.multimodal_inputs)
    for mm_input in multimodal_inputs:
        if mm_input is None:
            continue
        for mm_item in mm_input.mm_items:
            feature = getattr(mm_item, "feature", None)
            if isinstance(feature, torch.Tensor):
                mm_item.feature = feature.to("cpu")
    return SimpleNamespace(input_embeds=input_embeds, multimodal_inputs=multimodal_inputs)
