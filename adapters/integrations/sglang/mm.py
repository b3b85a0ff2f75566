"""What a multimodal prompt carries into prefill besides its embeddings, shaped as SGLang's scheduler reads it.

A delivered multimodal ``Req`` needs ``multimodal_inputs``: SGLang's ``prepare_for_extend`` iterates its
``mm_items`` (each with a ``modality`` and ``model_specific_data``), and M-RoPE models read
``mrope_positions`` (3, T) int32 and ``mrope_position_delta``, an int32 tensor shaped (1, 1), which batch
merging concatenates on dimension 0. The fork builds one placeholder image item, since the images were
encoded on the other side; so do we. A host with SGLang importable gets SGLang's own classes
(``sglang_multimodal_inputs``); ``multimodal_inputs_like_sglang`` is a stand-in of the same shape.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Modality",
    "MultimodalInputsFactory",
    "MultimodalInputsLike",
    "MultimodalItem",
    "multimodal_inputs_like_sglang",
    "position_delta",
    "sglang_multimodal_inputs",
]

# (mrope_positions (3, T) int32, mrope_position_delta (1, 1) int32) -> the Req's multimodal_inputs
MultimodalInputsFactory = Callable[[torch.Tensor, torch.Tensor], Any]


def position_delta(delta: int) -> torch.Tensor:
    """The M-RoPE delta as the fork hands it to prefill: the aux row's int32 value, shaped (1, 1)."""
    return torch.tensor([[delta]], dtype=torch.int32)


class Modality(enum.Enum):
    IMAGE = enum.auto()


@dataclass(slots=True)
class MultimodalItem:
    """One placeholder item: the encoder ran on the Encode side, so there is no feature to move."""

    modality: Any = Modality.IMAGE
    model_specific_data: dict[str, Any] = field(default_factory=dict)
    feature: Any = None
    precomputed_embeddings: Any = None

    def is_image(self) -> bool:
        return self.modality is Modality.IMAGE


@dataclass(slots=True)
class MultimodalInputsLike:
    """The fields of SGLang's ``MultimodalInputs`` a delivered request's prefill reads."""

    mm_items: list[Any]
    mrope_positions: torch.Tensor | None = None
    mrope_position_delta: torch.Tensor | None = None

    def contains_image_inputs(self) -> bool:
        return any(item.is_image() for item in self.mm_items)


def multimodal_inputs_like_sglang(mrope_positions: torch.Tensor, delta: torch.Tensor) -> MultimodalInputsLike:
    return MultimodalInputsLike([MultimodalItem()], mrope_positions, delta)


def sglang_multimodal_inputs(inputs_class: Any, item_class: Any, modality: Any) -> MultimodalInputsFactory:
    """A factory building the host's own classes (SGLang: ``MultimodalInputs``, ``MultimodalDataItem``,
    ``Modality.IMAGE``) with one placeholder item, as the fork does."""

    def build(mrope_positions: torch.Tensor, delta: torch.Tensor) -> Any:
        inputs = inputs_class(mm_items=[item_class(modality=modality, model_specific_data={})])
        inputs.mrope_positions = mrope_positions
        inputs.mrope_position_delta = delta
        return inputs

    return build


def sglang_factory_if_importable() -> MultimodalInputsFactory | None:
    """SGLang's own classes when SGLang is installed in this process, else None."""
    try:
        from sglang.srt.managers.schedule_batch import (  # type: ignore[import-not-found]
            Modality as SGLangModality,
        )
        from sglang.srt.managers.schedule_batch import MultimodalDataItem, MultimodalInputs
    except ImportError:
        return None
    return sglang_multimodal_inputs(MultimodalInputs, MultimodalDataItem, SGLangModality.IMAGE)
