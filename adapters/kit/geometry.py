"""Small random worlds, drawn by one rule for the fuzzer (``fuzz.py``), the random walk (``walk.py``) and the
explorer's fixed worlds (``explore.py``), and the check the simulator's options go through.

A receiver queue refuses a configuration whose first allocation cannot fit its pool (A0 = ceil(D / B)
blocks, more than N): no request could ever be admitted, so such a world would only test the refusal. It
is therefore never drawn. Everything else the draws covered still is: a pool smaller than the payload,
a payload larger than A0 plus the whole pool, A0 that is the whole pool (lengths are drawn per request,
by the fuzzer and the walk, not here).

The draws go through ``Draw`` so that Hypothesis (``data.draw``, which shrinks) and ``random.Random``
(the walk, seeded and fast) share the ranges and their order.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from epd_receiver.adapters.kit.world_config import WorldConfig
from epd_receiver.fsm.config import first_allocation

MAX_TOTAL = 1 << 20
BLOCK_SIZES = (1, 2, 4, 8, 16)
NUM_BLOCKS = (2, 24)  # the pool, in blocks: inclusive bounds
DEFAULT_BLOCKS = (1, 6)  # A0, in blocks, before it is bounded by the pool
HIDDEN_SIZES = (2, 4, 8)
DEEPSTACK = (0, 2)


class Draw(Protocol):
    """Where a draw's values come from: Hypothesis' data or a seeded ``random.Random``."""

    def integer(self, name: str, low: int, high: int) -> int: ...

    def choice(self, name: str, options: Sequence[int]) -> int: ...

    def flag(self, name: str) -> bool: ...


class RandomDraw:
    """``Draw`` from ``random.Random``: the calls the walk made before this module existed, in its order."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, name: str, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def choice(self, name: str, options: Sequence[int]) -> int:
        return self.rng.choice(options)

    def flag(self, name: str) -> bool:
        return self.rng.random() < 0.5


def first_allocation_problem(block_size: int, num_blocks: int, default_alloc_tokens: int) -> str | None:
    """Why no request could ever be admitted, in the options' words; None when A0 fits the pool."""
    needed = first_allocation(default_alloc_tokens, block_size)
    if needed <= num_blocks:
        return None
    return (
        f"default_alloc_tokens={default_alloc_tokens} needs {needed} blocks of block_size={block_size} tokens, "
        f"more than the pool's num_blocks={num_blocks}: no request could ever be admitted"
    )


def small_config(
    block_size: int,
    num_blocks: int,
    default_blocks: int,
    *,
    hidden_size: int = 2,
    deepstack: int = 0,
    async_abort: bool = False,
    local_conclusion: bool = False,
) -> WorldConfig:
    """D is half a block short of ``default_blocks`` blocks, so that with B > 1 the requested and the granted
    token counts differ (#2); A0 is then ``default_blocks`` blocks, which must fit the pool."""
    default_alloc_tokens = default_blocks * block_size - block_size // 2
    problem = first_allocation_problem(block_size, num_blocks, default_alloc_tokens)
    if problem is not None:
        raise ValueError(problem)
    return WorldConfig(
        block_size=block_size,
        num_blocks=num_blocks,
        default_alloc_tokens=default_alloc_tokens,
        hidden_size=hidden_size,
        deepstack=deepstack,
        max_total_tokens=MAX_TOTAL,
        async_abort=async_abort,
        local_conclusion=local_conclusion,
    )


def draw_config(draw: Draw) -> WorldConfig:
    """A random small world: the pool first, then A0 bounded by it (the one rule), then the rest."""
    block_size = draw.choice("block_size", BLOCK_SIZES)
    num_blocks = draw.integer("num_blocks", *NUM_BLOCKS)
    default_blocks = draw.integer("default_blocks", DEFAULT_BLOCKS[0], min(DEFAULT_BLOCKS[1], num_blocks))
    return small_config(
        block_size,
        num_blocks,
        default_blocks,
        hidden_size=draw.choice("hidden_size", HIDDEN_SIZES),
        deepstack=draw.integer("deepstack", *DEEPSTACK),
        async_abort=draw.flag("async_abort"),
        local_conclusion=draw.flag("local_conclusion"),
    )
