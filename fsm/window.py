"""The read capability: the only way the controller can touch the pool, and only while the Machine grants it.

The Machine opens a window at the head of a transition whose spec names ``reads`` and closes it when the
event finishes, whatever happened. Outside a window every read raises. Inside one, only what was granted
can be read: the aux row of A0[0] (once in a request's life, I2) and the tokens the current allocation
holds (I1). So a controller that reads at the wrong time, or the wrong rows, cannot do so quietly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic

from .errors import ReadOutsideWindow, Room
from .ports import AuxRow, BlockBuffers, PayloadT


class ReadWindow(Generic[PayloadT]):
    __slots__ = ("_aux_block", "_aux_spent", "_buffers", "_data_blocks", "_room")

    def __init__(self, buffers: BlockBuffers[PayloadT], room: Room) -> None:
        self._buffers = buffers
        self._room = room
        self._aux_block: int | None = None
        self._aux_spent = False
        self._data_blocks: tuple[int, ...] | None = None

    def grant_aux(self, first_block: int | None) -> None:
        self._aux_block = first_block

    def grant_data(self, blocks: tuple[int, ...]) -> None:
        self._data_blocks = blocks

    def close(self) -> None:
        self._aux_block = None
        self._data_blocks = None

    def read_aux(self, block: int) -> AuxRow:
        if self._aux_spent:
            raise ReadOutsideWindow(f"room {self._room}: aux row read a second time (block {block})")
        if self._aux_block is None or block != self._aux_block:
            raise ReadOutsideWindow(
                f"room {self._room}: aux read of block {block}; granted: {self._aux_block} (only A0[0])"
            )
        self._aux_spent = True
        return self._buffers.read_aux(block)

    def gather(self, blocks: Sequence[int], tokens: int, into: PayloadT, at: int) -> None:
        granted = self._data_blocks
        if granted is None or tuple(blocks) != granted:
            raise ReadOutsideWindow(f"room {self._room}: read of blocks {list(blocks)}; granted: {granted}")
        if not 0 <= tokens <= len(granted) * self._buffers.block_size:
            raise ReadOutsideWindow(f"room {self._room}: read of {tokens} tokens from {len(granted)} blocks")
        self._buffers.gather(blocks, tokens, into, at)
