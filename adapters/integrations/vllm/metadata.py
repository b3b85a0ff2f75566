"""What the scheduler-side connector tells the workers, and what the workers tell it back, each step.

The scheduler attaches ``LoadMetadata`` to every ``SchedulerOutput`` (vllm/v1/core/sched/scheduler.py:1768-1772),
which reaches every tensor-parallel worker of the step alike; so every worker loads the same items in the same
step by construction. Each worker answers with ``LoadedMetadata``; vLLM's ``ECOutputAggregator``
(vllm/distributed/ec_transfer/ec_connector/utils.py:95-147) folds the workers' answers with ``aggregate``
before ``update_connector_output``, and the scheduler checks that every worker loaded every item.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorMetadata, ECConnectorWorkerMetadata

__all__ = ["LoadMetadata", "LoadedMetadata"]


@dataclass
class LoadMetadata(ECConnectorMetadata):
    """The items to place into ``encoder_cache`` this step: mm_hash to its assembled (T, H) embeddings."""

    loads: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LoadedMetadata(ECConnectorWorkerMetadata):
    """Per mm_hash, how many workers placed it into their encoder cache this step."""

    loaded: Counter[str] = field(default_factory=Counter)

    def aggregate(self, other: ECConnectorWorkerMetadata) -> LoadedMetadata:
        """The workers' counts added up: an item every worker loaded counts the tensor-parallel size."""
        if not isinstance(other, LoadedMetadata):
            raise TypeError(f"cannot aggregate {type(other).__name__} into LoadedMetadata")
        return LoadedMetadata(self.loaded + other.loaded)
