"""What assembling a resumed payload costs: bandwidth and peak memory, against memcpy and the original.

Ours gathers A0 and the resume blocks into the one output the caller receives (from the pool's arena, or
freshly allocated); the original reads a view per block and joins them with ``torch.cat``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.payload import EmbeddingPayload, PayloadArena, token_bytes
from epd_receiver.adapters.tools.bench_config import BenchConfig
from epd_receiver.adapters.tools.bench_timing import interleaved


@dataclass(slots=True)
class _Resume:
    """One resumed payload sitting in the pool: A0 holds the first S tokens, A1 the remaining R."""

    pool: TorchBlockBuffers
    a0: list[int]
    a1: list[int]
    total: int
    sent: int

    @property
    def payload_bytes(self) -> int:
        h, k = self.pool.hidden_size, self.pool.deepstack_layers
        return self.total * token_bytes(h, k)


def random_pool(num_blocks: int, block_size: int, config: BenchConfig) -> TorchBlockBuffers:
    """A pool whose rows hold seeded random data, as if every block had been written."""
    h = config.hidden_size
    pool = TorchBlockBuffers(num_blocks, block_size, h, arena=PayloadArena(h))
    pool.embeddings.view(torch.int16).random_(0, 1 << 14, generator=torch.Generator().manual_seed(config.seed))
    pool.fill_ids.random_(0, 1 << 16)
    pool.mrope_positions.random_(0, 1 << 16)
    return pool


def _resume_case(config: BenchConfig, block_size: int) -> _Resume:
    b = block_size
    a0 = -(-config.default_tokens // b)
    sent = a0 * b
    if sent >= config.total_tokens:
        raise ValueError(f"T={config.total_tokens} fits in A0 ({sent} tokens at B={b}): nothing to resume")
    a1 = -(-(config.total_tokens - sent) // b)
    pool = random_pool(a0 + a1 + 2, b, config)
    order = torch.randperm(pool.num_blocks, generator=torch.Generator().manual_seed(config.seed)).tolist()
    return _Resume(pool, order[:a0], order[a0 : a0 + a1], config.total_tokens, sent)


def _assemble(case: _Resume) -> EmbeddingPayload:
    """Ours: one output (from the arena when the pool has one), A0 into [0, S), A1 into [S, T)."""
    payload = case.pool.new_payload(case.total, 0)
    case.pool.gather(case.a0, case.sent, payload, 0)
    case.pool.gather(case.a1, case.total - case.sent, payload, case.sent)
    return payload


def _original_get_buf(pool: TorchBlockBuffers, blocks: Sequence[int], total: int) -> tuple[torch.Tensor, ...]:
    """The original's read: a view per block, joined by ``torch.cat`` into fresh tensors."""
    b, h = pool.block_size, pool.hidden_size
    embeddings, ids, mrope = [], [], []
    gathered = 0
    for block in blocks:
        n = min(b, total - gathered)
        embeddings.append(pool.embeddings[block, : n * h].view(n, h))
        ids.append(pool.fill_ids[block, :n])
        mrope.append(pool.mrope_positions[block, : 3 * n].view(3, n))
        gathered += n
        if gathered >= total:
            break
    return torch.cat(embeddings), torch.cat(ids), torch.cat(mrope, dim=-1)


def _original_assemble(case: _Resume) -> tuple[torch.Tensor, ...]:
    """The original's path: read A0 and clone it at Transferring, read A1 at Success, concatenate."""
    embeddings, ids, mrope = _original_get_buf(case.pool, case.a0, case.sent)
    partial_embeddings, partial_mrope, partial_ids = embeddings.clone(), mrope.clone(), ids.tolist()
    del embeddings, ids, mrope
    rest_embeddings, rest_ids, rest_mrope = _original_get_buf(case.pool, case.a1, case.total - case.sent)
    return (
        torch.cat([partial_embeddings, rest_embeddings]),
        torch.cat([torch.tensor(partial_ids, dtype=torch.int32), rest_ids]),
        torch.cat([partial_mrope, rest_mrope], dim=-1),
    )


def _peak_allocated(action: Callable[[], object]) -> int:
    """The highest number of bytes torch had allocated on top of what it held before ``action`` began."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = action()
    del result
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def assembly(config: BenchConfig, block_size: int) -> dict[str, float]:
    """Bandwidth and peak memory of ours (warm arena, and fresh output) against memcpy and the original."""
    case = _resume_case(config, block_size)
    nbytes = case.payload_bytes
    arena = case.pool.arena
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(7)
    dst = torch.empty_like(src).copy_(src)  # already allocated and touched: the best a copy can do

    def ours() -> None:
        case.pool.recycle(_assemble(case))  # handed back at once, as the caller's release would be

    check = _assemble(case)  # also the warm-up: the arena's storage is faulted in once, here
    expected = _original_assemble(case)
    assembled = (check.embeddings, check.fill_ids, check.mrope_positions)
    if not all(torch.equal(a, b) for a, b in zip(expected, assembled, strict=True)):
        raise RuntimeError("our assembly and the original's differ")
    case.pool.recycle(check)
    seconds = interleaved(
        {
            "ours": ours,
            "memcpy": lambda: dst.copy_(src),
            "original": lambda: _original_assemble(case),
            "fresh": lambda: _assemble_fresh(case),
        },
        config.repeats,
    )
    rate = {name: nbytes / s / 1e9 for name, s in seconds.items()}
    peak_ours = _peak_allocated(ours)
    peak_fresh = _peak_allocated(lambda: _assemble_fresh(case))
    peak_original = _peak_allocated(lambda: _original_assemble(case))
    return {
        "block_size": block_size,
        "payload_mib": round(nbytes / 2**20, 1),
        "assembly_gb_per_s": round(rate["ours"], 3),
        "memcpy_gb_per_s": round(rate["memcpy"], 3),
        "cat_baseline_gb_per_s": round(rate["original"], 3),
        "fresh_output_gb_per_s": round(rate["fresh"], 3),
        "assembly_vs_memcpy": round(rate["ours"] / rate["memcpy"], 3),
        "fresh_output_vs_memcpy": round(rate["fresh"] / rate["memcpy"], 3),
        "assembly_vs_cat_baseline": round(rate["ours"] / rate["original"], 3),
        "peak_extra_memory_ratio": round(peak_ours / nbytes, 4),
        "peak_extra_memory_ratio_fresh_output": round(peak_fresh / nbytes, 4),
        "peak_extra_memory_ratio_cat_baseline": round(peak_original / nbytes, 4),
        "arena_idle_mib": round((arena.idle_bytes if arena else 0) / 2**20, 1),
    }


def _assemble_fresh(case: _Resume) -> EmbeddingPayload:
    arena, case.pool.arena = case.pool.arena, None
    try:
        return _assemble(case)
    finally:
        case.pool.arena = arena
