"""What the Encode side's writes cost over Mooncake, against raw engine writes of the same bytes.

One process holds three transfer engines on loopback tcp: the Encode side's, with its staging rows, and two
Language ranks', each with a pool in SGLang's layout. A sequence of chunks is planned as the Encode server
plans them (``Staging.plan``: per buffer the bytes of the tokens each block holds, rows that follow each
other on both sides merged into one entry, the aux row with a first chunk) into blocks granted from a
free list that earlier requests left in runs. It is written three ways, in turns:

- ours: each chunk into both ranks at once (``Engine.write_together``), as the server does;
- one rank after the other, a synchronous batch each (how the server wrote before);
- raw: as many bytes per rank in synchronous writes as large as the pool allows, one rank after the other.

Only the engine calls are timed, as the server's own statistics count them. The Encode loop and the ranks'
controllers are not running here: ``simulate --transport mooncake`` reports the same figure in a whole
run, where they share the machine's cores with the transfer.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.mooncake.link import Batch, Engine, Geometry, MooncakeMissing
from epd_receiver.adapters.tools.bench_config import BenchConfig
from epd_receiver.adapters.tools.bench_timing import interleaved
from epd_receiver.adapters.tools.encode.write import Staging

_BLOCK_SIZE = 128
_RANKS = 2


def mooncake_writes(config: BenchConfig) -> dict[str, Any]:
    """GB/s of our chunk writes, of the same chunks rank after rank, and of raw writes; None without Mooncake."""
    try:
        encode = Engine()
    except MooncakeMissing as missing:
        return {"mooncake_write": {"unavailable": str(missing)}, "mooncake_write_vs_raw": None}
    b = _BLOCK_SIZE if _BLOCK_SIZE in config.block_sizes else config.block_sizes[0]
    d_blocks = -(-config.default_tokens // b)
    geometry = Geometry(num_blocks=4 * d_blocks, block_size=b, hidden_size=config.hidden_size, deepstack=0)
    staging = Staging(encode, geometry)
    ranks = [_Rank(geometry) for _ in range(_RANKS)]
    try:
        chunks = _chunks(config, geometry, staging, ranks)
        moved = sum(sum(lengths) for chunk in chunks for _, _, _, lengths in chunk)
        raw = [_raw_batches(staging, rank, moved // _RANKS) for rank in ranks]

        def ours() -> None:
            for chunk in chunks:
                _ok(encode.write_together(chunk))

        def rank_after_rank() -> None:
            for chunk in chunks:
                _ok([encode.write(*batch) for batch in chunk])

        def raw_writes() -> None:
            _ok([encode.write(*batch) for batches in raw for batch in batches])

        actions: dict[str, Callable[[], object]] = {"ours": ours, "rank_after_rank": rank_after_rank, "raw": raw_writes}
        best = interleaved(actions, config.repeats)
    finally:
        staging.close()
        for rank in ranks:
            rank.close()
    rate = {name: moved / seconds / 1e9 for name, seconds in best.items()}
    return {
        "mooncake_write": {
            "block_size": b,
            "ranks": _RANKS,
            "chunks": len(chunks),
            "entries_per_chunk": round(sum(len(batch[3]) for c in chunks for batch in c) / len(chunks) / _RANKS, 1),
            "bytes": moved,
            "write_gb_per_s": round(rate["ours"], 3),
            "rank_after_rank_gb_per_s": round(rate["rank_after_rank"], 3),
            "raw_gb_per_s": round(rate["raw"], 3),
            "rank_after_rank_vs_raw": round(rate["rank_after_rank"] / rate["raw"], 3),
        },
        "mooncake_write_vs_raw": round(rate["ours"] / rate["raw"], 3),
    }


class _Rank:
    """A Language rank's pool, registered with its own engine: what a chunk is written into."""

    def __init__(self, geometry: Geometry) -> None:
        self.engine = Engine()
        self.pool = TorchBlockBuffers(geometry.num_blocks, geometry.block_size, geometry.hidden_size)
        self.engine.register(self.pool.buffers())
        self.pointers = self.pool.get_buf_infos()[0]

    def close(self) -> None:
        self.engine.unregister(self.pool.buffers())


def _chunks(config: BenchConfig, geometry: Geometry, staging: Staging, ranks: list[_Rank]) -> list[list[Batch]]:
    """First chunks of D tokens (with the aux row) and remainders of up to D, into blocks granted in order
    from a free list of runs: what a pool looks like once requests of many lengths have come and gone."""
    rng = random.Random(config.seed)
    b, d = geometry.block_size, config.default_tokens
    free = _churned_free_list(geometry.num_blocks, rng)
    chunks, taken = [], 0
    for i in range(2 * config.repeats + 2):
        tokens = d if i % 2 == 0 else rng.randint(1, d)
        needed = -(-tokens // b)
        blocks = [free[(taken + j) % len(free)] for j in range(needed)]
        taken += needed
        pairs = [(row, block, min(b, tokens - row * b)) for row, block in enumerate(blocks)]
        with_aux = i % 2 == 0
        chunks.append([(rank.engine.session, *staging.plan(rank.pointers, pairs, with_aux)) for rank in ranks])
    return chunks


def _churned_free_list(num_blocks: int, rng: random.Random) -> list[int]:
    runs, start = [], 0
    while start < num_blocks:
        length = min(rng.randint(1, 16), num_blocks - start)
        runs.append(list(range(start, start + length)))
        start += length
    rng.shuffle(runs)
    return [block for run in runs for block in run]


def _raw_batches(staging: Staging, rank: _Rank, total: int) -> list[Batch]:
    """``total`` bytes from the staging embeddings into the rank's, in writes as large as the pool allows."""
    span = staging.rows.embeddings.nbytes
    batches, moved = [], 0
    while moved < total:
        length = min(span, total - moved)
        batches.append((rank.engine.session, [staging.pointers[0]], [rank.pointers[0]], [length]))
        moved += length
    return batches


def _ok(codes: list[int]) -> None:
    if any(codes):
        raise RuntimeError(f"a bench write failed: return codes {codes}")
