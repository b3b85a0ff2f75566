"""The module vLLM's factory loads: ``EPDReceiverConnector``, one class for both roles and both sides.

``ec_transfer_config = {"ec_connector": "EPDReceiverConnector", "ec_connector_module_path":
"epd_receiver.adapters.integrations.vllm.connector", "ec_role": "ec_consumer" | "ec_producer",
"ec_connector_extra_config": {...}}``: ``ECConnectorFactory.get_connector_class`` imports the module and takes
the class by name (vllm/distributed/ec_transfer/ec_connector/factory.py:59-74); the scheduler builds it with
``ECConnectorRole.SCHEDULER`` (vllm/v1/core/sched/scheduler.py:209-213) and each worker with
``ECConnectorRole.WORKER`` (vllm/distributed/ec_transfer/ec_transfer_state.py:26-40).

A consumer's scheduler-side instance runs the controller (``scheduler.py``); its worker-side instances place
the assembled items (``worker.py``). A producer's worker-side instance sends what its encoder produced
(``producer.py``); a producer's scheduler-side instance has nothing to plan, since the consumer asks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.ec_transfer.ec_connector.base import (
    ECConnectorBase,
    ECConnectorMetadata,
    ECConnectorRole,
    ECConnectorWorkerMetadata,
)

from epd_receiver.adapters.integrations.vllm.config import ConsumerConfig
from epd_receiver.adapters.integrations.vllm.metadata import LoadedMetadata, LoadMetadata
from epd_receiver.adapters.integrations.vllm.scheduler import ReceiveScheduler
from epd_receiver.adapters.integrations.vllm.stats import PrometheusReplay, ReceiveStats, RecordingMetrics
from epd_receiver.adapters.integrations.vllm.worker import LoadingWorker, worker_device

if TYPE_CHECKING:
    from vllm.distributed.ec_transfer.ec_connector.metrics import ECConnectorStats
    from vllm.v1.outputs import ECConnectorOutput

__all__ = ["EPDReceiverConnector"]


class EPDReceiverConnector(ECConnectorBase):
    """vLLM's EC connector interface over the receiver controller (consumer) and its sender (producer)."""

    def __init__(self, vllm_config: Any, role: ECConnectorRole) -> None:
        super().__init__(vllm_config, role)
        extra = vllm_config.ec_transfer_config.ec_connector_extra_config or {}
        self.receiver: ReceiveScheduler | None = None
        self.loader: LoadingWorker | None = None
        self.sender: Any = None
        self._recording: RecordingMetrics | None = None
        if self.is_consumer and role is ECConnectorRole.SCHEDULER:
            config = ConsumerConfig.from_vllm_config(vllm_config)
            self._recording = RecordingMetrics()
            self.receiver = ReceiveScheduler(
                config, config.make_link_factory(), clock=config.make_clock(), metrics=self._recording
            )
        elif self.is_consumer:
            model = vllm_config.model_config
            self.loader = LoadingWorker(worker_device(vllm_config), None if model is None else model.dtype)
        elif role is ECConnectorRole.WORKER and self.is_producer and "bootstrap" in extra and _first_tp_rank():
            from epd_receiver.adapters.integrations.vllm.producer import ItemProducer

            self.sender = ItemProducer(extra)

    # ---- worker side -----------------------------------------------------------------------------

    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        if self.loader is not None and isinstance(metadata, LoadMetadata):
            self.loader.load(metadata, encoder_cache)

    def save_caches(self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, **kwargs: Any) -> None:
        """A producer offers the item to whichever consumer asks for it; a consumer saves nothing."""
        if self.sender is not None:
            self.sender.offer(mm_hash, encoder_cache[mm_hash])

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Nothing is delayed past a request's end; the items loaded this step are reported as received."""
        return None, (None if self.loader is None else self.loader.finished())

    def build_connector_worker_meta(self) -> ECConnectorWorkerMetadata | None:
        return None if self.loader is None else self.loader.take_metadata()

    def shutdown(self) -> None:
        close = getattr(self.sender, "close", None)
        if close is not None:
            close()

    # ---- scheduler side --------------------------------------------------------------------------

    def has_cache_item(self, identifier: str) -> bool:
        return self.receiver is not None and self.receiver.has_cache_item(identifier)

    def ensure_cache_available(self, request: Any, num_computed_tokens: int) -> bool:
        return self.receiver is None or self.receiver.ensure_cache_available(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, index: int) -> None:
        if self.receiver is not None:
            self.receiver.update_state_after_alloc(request, index)

    def build_connector_meta(self, scheduler_output: Any) -> ECConnectorMetadata:
        if self.receiver is None:
            return LoadMetadata()
        return self.receiver.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: ECConnectorOutput) -> None:
        meta = connector_output.ec_connector_worker_meta
        if self.receiver is not None:
            self.receiver.update_connector_output(meta if isinstance(meta, LoadedMetadata) else None)

    def take_unavailable_requests(self) -> set[str]:
        return set() if self.receiver is None else self.receiver.take_unavailable_requests()

    def update_state_after_free(self, request: Any, index: int) -> None:
        if self.receiver is not None:
            self.receiver.update_state_after_free(request, index)

    def request_finished(self, request: Any) -> tuple[bool, dict[str, Any] | None]:
        return (False, None) if self.receiver is None else self.receiver.request_finished(request)

    def has_pending_push_work(self) -> bool:
        return self.receiver is not None and self.receiver.has_pending_push_work()

    def get_ec_connector_stats(self) -> ECConnectorStats | None:
        return None if self._recording is None else self._recording.take()

    @classmethod
    def build_ec_connector_stats(cls, data: dict[str, Any] | None = None) -> ECConnectorStats | None:
        return ReceiveStats(data) if data is not None else ReceiveStats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> PrometheusReplay:
        extra = vllm_config.ec_transfer_config.ec_connector_extra_config or {}
        hidden = extra.get("hidden_size") or 0
        return PrometheusReplay(
            vllm_config, metric_types, labelnames, per_engine_labelvalues, bytes_per_token=2 * int(hidden)
        )


def _first_tp_rank() -> bool:
    """Every tensor-parallel worker of an encoder holds the same outputs: the first one alone serves them, as
    one Encode rank registered with the bootstrap server."""
    from vllm.distributed import parallel_state

    return not parallel_state.model_parallel_is_initialized() or parallel_state.get_tensor_model_parallel_rank() == 0
