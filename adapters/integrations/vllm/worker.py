"""The worker side of the consumer: place each assembled item into vLLM's encoder cache on the worker's device.

The model runner's EC mixin (vllm/v1/worker/ec_connector_model_runner_mixin.py:53-83) runs, per step:
``bind_connector_metadata`` → ``start_load_caches(encoder_cache)`` → the encoder and the gather of
multimodal embeddings → ``get_finished`` → ``build_connector_worker_meta`` → ``clear_connector_metadata``.
Nothing is received here: the controller runs in the scheduler process, which vLLM steps even when no token is
scheduled, while a consumer's model runner skips the connector on such steps
(vllm/v1/worker/gpu_model_runner.py:3955-3970), so deadlines and fences would stall if they lived here.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from epd_receiver.adapters.integrations.vllm.metadata import LoadedMetadata, LoadMetadata

__all__ = ["LoadingWorker", "worker_device"]


def worker_device(vllm_config: Any) -> torch.device:
    """Where vLLM's encoder cache lives: the device config's device (the current CUDA device for "cuda")."""
    device = vllm_config.device_config.device
    return device if isinstance(device, torch.device) else torch.device(vllm_config.device_config.device_type)


class LoadingWorker:
    """One worker's loads: what the step's metadata names goes into ``encoder_cache``, and is reported."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.device = device
        self.dtype = dtype  # the model's dtype; None keeps the received one (bfloat16)
        self._loaded: Counter[str] = Counter()

    def load(self, metadata: LoadMetadata, encoder_cache: dict[str, torch.Tensor]) -> None:
        for mm_hash, embeddings in metadata.loads.items():
            encoder_cache[mm_hash] = embeddings.to(device=self.device, dtype=self.dtype or embeddings.dtype)
            self._loaded[mm_hash] = 1

    def finished(self) -> set[str] | None:
        """The items loaded this step (as ``finished_recving``): they are in the encoder cache now."""
        return set(self._loaded) or None

    def take_metadata(self) -> LoadedMetadata | None:
        """This step's loads for the scheduler; reset for the next step."""
        if not self._loaded:
            return None
        loaded, self._loaded = self._loaded, Counter()
        return LoadedMetadata(loaded)
