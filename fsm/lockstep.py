"""A fingerprint of one rank's allocator operations, compared across ranks to catch drift early.

Ranks that took the same branches made the same allocations, frees and fences in the same order. A rank
whose pool drifted (#4, #16) shows a different fingerprint many iterations before it would hand one block
to two requests or wait for blocks its peers have already granted.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from .errors import Room
from .ports import BlockAllocator


class LockstepAllocator:
    """The BlockAllocator port, forwarded, with every operation and its result folded into a CRC32."""

    def __init__(self, inner: BlockAllocator) -> None:
        self.inner = inner
        self.digest = 0

    @property
    def block_size(self) -> int:
        return self.inner.block_size

    @property
    def num_blocks(self) -> int:
        return self.inner.num_blocks

    @property
    def free_count(self) -> int:
        return self.inner.free_count

    def alloc(self, owner: Room, tokens: int) -> tuple[int, ...] | None:
        blocks = self.inner.alloc(owner, tokens)
        self._fold("alloc", owner, blocks or ())
        return blocks

    def free(self, owner: Room, blocks: Sequence[int]) -> None:
        self.inner.free(owner, blocks)
        self._fold("free", owner, blocks)

    def fence(self, owner: Room, blocks: Sequence[int]) -> None:
        self.inner.fence(owner, blocks)
        self._fold("fence", owner, blocks)

    def unfence(self, owner: Room, blocks: Sequence[int]) -> None:
        self.inner.unfence(owner, blocks)
        self._fold("unfence", owner, blocks)

    def _fold(self, operation: str, owner: Room, blocks: Sequence[int]) -> None:
        self.digest = zlib.crc32(f"{operation} {owner} {list(blocks)};".encode(), self.digest)
