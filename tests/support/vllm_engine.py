"""vLLM's engine step around our connectors, with vLLM's own objects, in the order vLLM calls them.

Nothing of vLLM is imitated but the order of the calls: the connectors are built by vLLM's factory
(``ECConnectorFactory.create_connector``, vllm/distributed/ec_transfer/ec_connector/factory.py:35-56) from a real
``VllmConfig``; requests are vLLM's ``Request`` with ``MultiModalFeatureSpec`` features; each step builds a real
``SchedulerOutput``; each worker runs vLLM's own EC mixin context (``ECConnectorModelRunnerMixin.
_get_ec_connector_output``, vllm/v1/worker/ec_connector_model_runner_mixin.py:53-83) with its connector installed
as the process's EC agent, as each worker process has its own; and the workers' outputs are folded by vLLM's
``ECOutputAggregator`` (vllm/distributed/ec_transfer/ec_connector/utils.py:95-147). What stands in for vLLM's
``Scheduler.schedule``/``update_from_output`` is ``Engine.step``, which calls the connector where the
scheduler does (vllm/v1/core/sched/scheduler.py, lines cited at each call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import vllm.distributed.ec_transfer.ec_transfer_state as ec_state
from vllm.config import DeviceConfig, ECTransferConfig, ParallelConfig, VllmConfig
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorBase, ECConnectorRole
from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory
from vllm.distributed.ec_transfer.ec_connector.utils import ECOutputAggregator
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.worker.ec_connector_model_runner_mixin import ECConnectorModelRunnerMixin

CONNECTOR = "EPDReceiverConnector"
MODULE = "epd_receiver.adapters.integrations.vllm.connector"


def vllm_config(extra: dict[str, Any], *, role: str = "ec_consumer", workers: int = 1) -> VllmConfig:
    """A real VllmConfig with our connector and no model (the hidden size comes from the extra config)."""
    return VllmConfig(
        device_config=DeviceConfig(device="cpu"),
        parallel_config=ParallelConfig(tensor_parallel_size=workers),
        ec_transfer_config=ECTransferConfig(
            ec_connector=CONNECTOR,
            ec_connector_module_path=MODULE,
            ec_role=role,
            ec_connector_extra_config=extra,
        ),
    )


def request(request_id: str, items: list[tuple[str, int]], *, text: int = 4) -> Request:
    """A prompt of ``text`` tokens, then each item's placeholder run (mm_hash, its number of embeddings)."""
    features, offset = [], text
    for mm_hash, length in items:
        position = PlaceholderRange(offset=offset, length=length)
        features.append(
            MultiModalFeatureSpec(
                data=None, modality="image", identifier=mm_hash, mm_position=position, mm_hash=mm_hash
            )
        )
        offset += length
    prompt = list(range(offset + 1))
    return Request(request_id, prompt, SamplingParams(max_tokens=1), None, mm_features=features)


@contextlib.contextmanager
def as_worker_agent(connector: ECConnectorBase) -> Iterator[None]:
    """This worker's connector as the process's EC agent (``get_ec_transfer()``), as in its own process."""
    saved = ec_state._EC_CONNECTOR_AGENT
    ec_state._EC_CONNECTOR_AGENT = connector
    try:
        yield
    finally:
        ec_state._EC_CONNECTOR_AGENT = saved


@dataclass
class Engine:
    """One consumer: its scheduler-side connector, ``workers`` worker-side ones with an encoder cache each."""

    config: VllmConfig
    scheduler: ECConnectorBase = field(init=False)
    workers: list[ECConnectorBase] = field(init=False)
    caches: list[dict[str, torch.Tensor]] = field(init=False)
    waiting: list[Request] = field(default_factory=list)
    running: list[Request] = field(default_factory=list)  # prefilled, decoding one more step
    finished: dict[str, str] = field(default_factory=dict)  # request id -> "prefilled" | "failed" | "aborted"
    cached: set[str] = field(default_factory=set)  # the encoder cache manager's entries (mm_hash)
    encoded_locally: list[str] = field(default_factory=list)
    stats: list[Any] = field(default_factory=list)
    skip_worker: int | None = None  # a worker that misses the step's connector call (rank disagreement)

    def __post_init__(self) -> None:
        self.scheduler = ECConnectorFactory.create_connector(self.config, ECConnectorRole.SCHEDULER)
        n = self.config.parallel_config.tensor_parallel_size
        self.workers = [ECConnectorFactory.create_connector(self.config, ECConnectorRole.WORKER) for _ in range(n)]
        self.caches = [{} for _ in range(n)]

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def abort(self, request_id: str) -> None:
        """The client went away: the scheduler finishes the request (request_finished, scheduler.py:3047-3049)."""
        req = next(r for r in self.waiting if r.request_id == request_id)
        self.waiting.remove(req)
        self.scheduler.request_finished(req)
        self.finished[request_id] = "aborted"

    def step(self) -> SchedulerOutput:
        """One engine step: schedule, the workers' EC context, then the scheduler's update from the output."""
        output = SchedulerOutput.make_empty()
        prefilled: list[Request] = []
        done = list(self.running)
        for req in list(self.waiting):
            # scheduler.py:1247/1271 (waiting path, _ec_transfer_pending :2678-2686)
            if not self.scheduler.ensure_cache_available(req, req.num_computed_tokens):
                continue
            for index, feature in enumerate(req.mm_features):
                if feature.identifier in self.cached:
                    continue  # encoder_cache_manager.check_and_update_cache (scheduler.py:2149)
                if self.scheduler.has_cache_item(feature.identifier):  # scheduler.py:2190
                    self.cached.add(feature.identifier)  # encoder_cache_manager.allocate (scheduler.py:2011)
                    self.scheduler.update_state_after_alloc(req, index)  # scheduler.py:2012-2013
                else:
                    self.encoded_locally.append(feature.identifier)
            self.waiting.remove(req)
            prefilled.append(req)
        output.ec_connector_metadata = self.scheduler.build_connector_meta(output)  # scheduler.py:1768-1772
        outputs = [self._run_worker(i, output) for i in range(len(self.workers))]
        model_output = ECOutputAggregator().aggregate(outputs, output_rank=0)
        ec_output = None if model_output is None else model_output.ec_connector_output
        for request_id in self.scheduler.take_unavailable_requests():  # scheduler.py:2559-2562
            self._fail(request_id)
        if ec_output is not None:
            self.scheduler.update_connector_output(ec_output)  # scheduler.py:2585-2586
        stats = self.scheduler.get_ec_connector_stats()  # scheduler.py:2609-2611
        if stats is not None:
            self.stats.append(stats)
        for req in prefilled:  # the prefill consumed every input: freed (scheduler.py:2859-2860)
            req.num_computed_tokens = req.num_prompt_tokens
            for index in range(len(req.mm_features)):
                self.scheduler.update_state_after_free(req, index)
        for req in done:  # its one decode step ran: finished (scheduler.py:3047-3049), unless it failed
            if req.request_id not in self.finished:
                self.scheduler.request_finished(req)
                self.finished[req.request_id] = "prefilled"
        self.running = prefilled
        return output

    def _run_worker(self, index: int, output: SchedulerOutput) -> ModelRunnerOutput:
        if index == self.skip_worker:
            return EMPTY_MODEL_RUNNER_OUTPUT
        with (
            as_worker_agent(self.workers[index]),
            ECConnectorModelRunnerMixin._get_ec_connector_output(output, self.caches[index]) as ec_output,
        ):
            pass  # the encoder and the gather of multimodal embeddings run here in vLLM
        return ModelRunnerOutput.with_ec_conn_output_only(ec_output)

    def _fail(self, request_id: str) -> None:
        """scheduler.finish_requests(FINISHED_ERROR): request_finished before the encoder cache is freed."""
        req = next((r for r in self.waiting + self.running if r.request_id == request_id), None)
        if req is None:
            return
        (self.waiting if req in self.waiting else self.running).remove(req)
        self.scheduler.request_finished(req)
        self.finished[request_id] = "failed"

    def pending(self) -> bool:
        """The engine loop keeps stepping (scheduler.py:3170-3182)."""
        return bool(self.waiting or self.running) or self.scheduler.has_pending_push_work()
