"""The SGLang bridge: the receiver controller in place of the fork's Language-side multimodal queues.

``install(scheduler, connect=..., prepare_abort=...)`` is the one call a fork user makes in the Language
branch of the scheduler's constructor, instead of building the fork's allocator, ``MultimodalDataBuffers``
and two queues. It leaves the scheduler with:

- ``disagg_metadata_buffers``: the bridge's pool, the only one (``TorchBlockBuffers`` has the fork's
  layout and ``get_buf_infos()``), which ``connect`` registers with the transport;
- ``req_to_metadata_buffer_idx_allocator``: an object whose ``free_with_req(req)`` gives a delivered
  payload back after prefill (a no-op for any other request, and the second time);
- ``disagg_language_prealloc_queue`` and ``disagg_language_transfer_queue``: the fork's two queues, whose
  entries have its ``MultimodalLanguageRequest`` shape, so the event loop, the abort handler and the load
  report run unchanged; failures are answered inside ``pop_transferred()`` with ``prepare_abort`` (status
  500) and ``stream_output``, as the fork answers its own;
- tensor-parallel ranks reduced over the scheduler's ``attn_tp_cpu_group`` (gloo).

The pieces live in ``bridge`` (queues), ``link`` (the link and its evidence that the
sender stopped) and ``mm`` (what a multimodal request carries into prefill).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

from epd_receiver.adapters.integrations.sglang.bridge import (
    BridgeConfig,
    EmbeddingBridge,
    FailureHook,
    ReceiverFactory,
    is_fake,
)
from epd_receiver.adapters.integrations.sglang.link import (
    LinkFactory,
    ReceiverLink,
)
from epd_receiver.adapters.integrations.sglang.mm import (
    MultimodalInputsFactory,
    multimodal_inputs_like_sglang,
    sglang_factory_if_importable,
)
from epd_receiver.fsm import RankGroup, ReceiverConfig, ReceiverError
from epd_receiver.fsm.ports import Clock, ReceiverMetrics

logger = logging.getLogger(__name__)

BufInfos = tuple[list[int], list[int], list[int]]


def receiver_factory(
    manager: Any, receiver_class: Any, warmup_receiver_class: Any, bootstrap_port: int
) -> ReceiverFactory:
    """Build each request's receiver as the fork does: its transport's receiver class over one shared
    manager, or the fake class for a warm-up request, addressed at ``bootstrap_host:bootstrap_port``."""

    def make(req: Any) -> Any:
        cls = warmup_receiver_class if is_fake(req) else receiver_class
        return cls(
            mgr=manager,
            bootstrap_addr=f"{req.bootstrap_host}:{bootstrap_port}",
            bootstrap_room=req.bootstrap_room,
            prefill_dp_rank=getattr(req, "data_parallel_rank", None),
        )

    return make


def report_like_sglang(scheduler: Any, prepare_abort: Callable[..., None]) -> FailureHook:
    """Answer a failed request as the fork answers a failed transfer: ``prepare_abort`` with status 500,
    then ``stream_output`` at once, and the failed-transfer metric when metrics are on."""

    def report(req: Any, error: ReceiverError) -> None:
        message = f"embedding transfer failed for rid={getattr(req, 'rid', None)}: {error}"
        logger.error(message)
        prepare_abort(req, message, status_code=HTTPStatus.INTERNAL_SERVER_ERROR)
        scheduler.stream_output([req], req.return_logprob)
        if getattr(scheduler, "enable_metrics", False):
            scheduler.metrics_collector.increment_transfer_failed_reqs()

    return report


def install(
    scheduler: Any,
    *,
    connect: Callable[[BufInfos], ReceiverFactory],
    prepare_abort: Callable[..., None],
    hidden_size: int | None = None,
    deepstack_layers: int | None = None,
    receiver_config: ReceiverConfig | None = None,
    clock: Clock | None = None,
    multimodal_inputs: MultimodalInputsFactory | None = None,
    environ: Mapping[str, str] | None = None,
    link_factory: LinkFactory = ReceiverLink,
    metrics: ReceiverMetrics | None = None,
) -> EmbeddingBridge:
    """Wire the bridge into a fork scheduler (module docstring) and return it.

    ``connect(buf_infos)`` registers the pool with the transport (the fork: a ``KVArgs`` whose aux
    pointers are ``buf_infos``, and the multimodal manager built from it) and returns the receiver
    factory (``receiver_factory``). ``prepare_abort`` is the fork's ``disaggregation.utils.prepare_abort``.
    The model's hidden size and deepstack layer count are read from ``scheduler.model_config`` unless
    given; SGLang's ``MultimodalInputs`` is built for multimodal prompts when SGLang is importable.
    ``link_factory`` turns a receiver into the controller's link (``ReceiverLink`` reads the Mooncake
    manager's table for evidence that the sender stopped). ``metrics`` is fed by the controller (state
    changes, ended receives, once per iteration); the Prometheus adapter,
    ``PrometheusMetrics(prefix="sglang:", registry=...)``, puts its families in the registry the scheduler's
    metrics are served from (``prometheus_client.REGISTRY`` unless the host keeps its own).
    """
    _refuse_fork_queues(scheduler)
    config = BridgeConfig.from_env(
        hidden_size if hidden_size is not None else scheduler.model_config.hidden_size,
        deepstack_layers if deepstack_layers is not None else _deepstack_layers(scheduler),
        environ,
    )
    bridge = EmbeddingBridge(
        config,
        on_failed=report_like_sglang(scheduler, prepare_abort),
        receiver_config=receiver_config,
        ranks=rank_group(getattr(scheduler, "attn_tp_cpu_group", None)),
        clock=clock,
        multimodal_inputs=multimodal_inputs or sglang_factory_if_importable() or multimodal_inputs_like_sglang,
        link_factory=link_factory,
        metrics=metrics,
    )
    bridge.receiver_factory = connect(bridge.get_buf_infos())
    scheduler.disagg_metadata_buffers = bridge.buffers
    scheduler.req_to_metadata_buffer_idx_allocator = bridge.releaser
    scheduler.disagg_language_prealloc_queue = bridge.prealloc_queue
    scheduler.disagg_language_transfer_queue = bridge.transfer_queue
    return bridge


def rank_group(group: Any) -> RankGroup | None:
    """The scheduler's attention-TP gloo group as the controller's rank group (None: a single rank)."""
    if group is None:
        return None
    from epd_receiver.adapters.ports.ranks import GlooRankGroup

    return GlooRankGroup(group=group)


def _deepstack_layers(scheduler: Any) -> int:
    """As the fork counts them: the vision config's deepstack layer indexes, if the model has any."""
    hf_config = getattr(scheduler.model_config, "hf_config", None)
    vision = getattr(hf_config, "vision_config", None)
    return len(getattr(vision, "deepstack_visual_indexes", None) or ())


def _refuse_fork_queues(scheduler: Any) -> None:
    """The fork's own queues would keep a second pool registered with a live transfer manager."""
    queue = getattr(scheduler, "disagg_language_prealloc_queue", None)
    if getattr(queue, "data_manager", None) is not None:
        raise ValueError(
            "the scheduler already built the fork's Language-side queues (with their own pool and transfer "
            "manager): call install() instead of building them, not after"
        )
