"""The assembled payload a successful request hands to the caller."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch


def crc32(parts: Iterable[torch.Tensor], value: int = 0) -> int:
    """CRC32 over the raw bytes of ``parts`` in order, as one stream (chunks of one tensor may follow)."""
    for part in parts:
        value = zlib.crc32(part.contiguous().view(torch.uint8).numpy(), value)
    return value


@dataclass(slots=True)
class EmbeddingPayload:
    """Everything the Language side needs to prefill one multimodal prompt of T tokens."""

    embeddings: torch.Tensor  # (T, H) bfloat16
    fill_ids: torch.Tensor  # (T,) int32, image placeholders expanded
    mrope_positions: torch.Tensor  # (3, T) int32
    deepstack: torch.Tensor | None  # (T, H*K) bfloat16 when the model has deepstack layers
    total_tokens: int
    mrope_delta: int

    @classmethod
    def empty(
        cls, total_tokens: int, hidden_size: int, deepstack_layers: int, mrope_delta: int = 0
    ) -> EmbeddingPayload:
        return cls(
            embeddings=torch.empty(total_tokens, hidden_size, dtype=torch.bfloat16),
            fill_ids=torch.empty(total_tokens, dtype=torch.int32),
            mrope_positions=torch.empty(3, total_tokens, dtype=torch.int32),
            deepstack=(
                torch.empty(total_tokens, hidden_size * deepstack_layers, dtype=torch.bfloat16)
                if deepstack_layers
                else None
            ),
            total_tokens=total_tokens,
            mrope_delta=mrope_delta,
        )

    def crc32(self) -> int:
        """The integrity checksum: embeddings, ids, positions (three runs of T), then deepstack."""
        parts = [self.embeddings, self.fill_ids, self.mrope_positions]
        return crc32(parts + ([self.deepstack] if self.deepstack is not None else []))

    def input_embeds(self) -> torch.Tensor:
        """What the model's forward takes: deepstack features joined on the last dimension."""
        if self.deepstack is None:
            return self.embeddings
        return torch.cat([self.embeddings, self.deepstack], dim=-1)
