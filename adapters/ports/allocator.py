"""The block allocator: SGLang's FIFO, all-or-nothing policy, plus the ownership the original lacked.

The original appended any freed index to the free list, so a double free put a block there twice and two
later requests were handed the same rows (#14). Here every block has at most one owner, and a free that
names a block the caller does not own raises before anything changes. The original also freed the
blocks of an aborted request while its sender could still write into them (#23); here such blocks are
fenced: attributed to the failed room, out of every allocation, until the room's sender has stopped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from epd_receiver.fsm import OwnershipError, Room


class OwningBlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: dict[int, Room] = {}
        self._fenced: dict[int, Room] = {}
        self.rejected_frees = 0

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self._block_size)

    def alloc(self, owner: Room, tokens: int) -> tuple[int, ...] | None:
        if tokens <= 0:
            raise ValueError(f"room {owner}: an allocation covers at least one token, not {tokens}")
        needed = self.blocks_for(tokens)
        if needed > len(self._free):
            return None
        blocks = tuple(self._free.popleft() for _ in range(needed))
        for block in blocks:
            self._owner[block] = owner
        return blocks

    def free(self, owner: Room, blocks: Sequence[int]) -> None:
        self._take(self._owner, owner, blocks, "frees")
        self._free.extend(blocks)

    def fence(self, owner: Room, blocks: Sequence[int]) -> None:
        self._take(self._owner, owner, blocks, "fences")
        self._fenced.update(dict.fromkeys(blocks, owner))

    def unfence(self, owner: Room, blocks: Sequence[int]) -> None:
        self._take(self._fenced, owner, blocks, "unfences")
        self._free.extend(blocks)

    def _take(self, holders: dict[int, Room], owner: Room, blocks: Sequence[int], verb: str) -> None:
        """Remove ``blocks`` from ``holders`` if ``owner`` holds every one of them; else raise, changing nothing."""
        problems = [b for b in blocks if holders.get(b) != owner]
        if problems or len(set(blocks)) != len(blocks):
            self.rejected_frees += 1
            described = {b: self._describe(b) for b in problems}
            raise OwnershipError(f"room {owner} {verb} {list(blocks)}; not its own: {described}")
        for block in blocks:
            del holders[block]

    def _describe(self, block: int) -> str:
        kind, room = self.holder(block)
        return kind if room is None else f"{kind} by {room}"

    # ---- accounting (leak checks, reports) -------------------------------------------------------

    def free_list(self) -> tuple[int, ...]:
        """The free blocks in the order the next allocations will take them."""
        return tuple(self._free)

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def owned_count(self) -> int:
        return len(self._owner)

    @property
    def fenced_count(self) -> int:
        return len(self._fenced)

    def holder(self, block: int) -> tuple[str, Room | None]:
        """Who may touch ``block`` now: ("owned", room), ("fenced", room) or ("free", None)."""
        if block in self._owner:
            return "owned", self._owner[block]
        if block in self._fenced:
            return "fenced", self._fenced[block]
        return "free", None

    def fences(self) -> dict[Room, tuple[int, ...]]:
        return _by_room(self._fenced)

    def owned_by(self, owner: Room) -> tuple[int, ...]:
        return tuple(sorted(b for b, o in self._owner.items() if o == owner))

    def owners(self) -> dict[Room, tuple[int, ...]]:
        return _by_room(self._owner)


def _by_room(holders: dict[int, Room]) -> dict[Room, tuple[int, ...]]:
    result: dict[Room, list[int]] = {}
    for block, room in holders.items():
        result.setdefault(room, []).append(block)
    return {room: tuple(sorted(blocks)) for room, blocks in result.items()}
