"""Tokens as a sender holds them, and their writing into a ``TorchBlockBuffers`` pool, for the block-buffer tests.

Distinct, seeded values everywhere, so that any misplaced element is detectable. The pool fixtures
(``deepstack_layers``, ``buffers``) are in ``tests/ports/conftest.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epd_receiver.adapters.ports.buffers import TorchBlockBuffers

NUM_BLOCKS = 8
B = 4
H = 8


@dataclass(frozen=True)
class Tokens:
    """Per-token source data for n tokens, as the sender would hold it."""

    embeddings: torch.Tensor  # (n, H) bf16
    fill_ids: torch.Tensor  # (n,) int32
    mrope: torch.Tensor  # (3, n) int32
    deepstack: torch.Tensor | None  # (n, H*K) bf16

    @property
    def n(self) -> int:
        return int(self.fill_ids.shape[0])

    def slice(self, lo: int, hi: int) -> Tokens:
        return Tokens(
            self.embeddings[lo:hi],
            self.fill_ids[lo:hi],
            self.mrope[:, lo:hi],
            None if self.deepstack is None else self.deepstack[lo:hi],
        )


def make_tokens(n: int, k: int, seed: int = 0) -> Tokens:
    """Distinct, seeded values everywhere, so that any misplaced element is detectable."""
    gen = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n, H, generator=gen).to(torch.bfloat16)
    fill_ids = torch.arange(n, dtype=torch.int32) + 1000 * (seed + 1)
    mrope = (torch.arange(3 * n, dtype=torch.int32) + 100_000 * (seed + 1)).view(3, n)
    deepstack = torch.randn(n, H * k, generator=gen).to(torch.bfloat16) if k else None
    return Tokens(embeddings, fill_ids, mrope, deepstack)


def write_tokens(buffers: TorchBlockBuffers, blocks: list[int], tokens: Tokens) -> None:
    """Write tokens over blocks in list order, B per block, the last block possibly partial."""
    b = buffers.block_size
    for i, block in enumerate(blocks):
        lo, hi = i * b, min((i + 1) * b, tokens.n)
        if lo >= hi:
            break
        part = tokens.slice(lo, hi)
        buffers.write_block(block, part.embeddings, part.fill_ids, part.mrope, part.deepstack)
