"""OwningBlockAllocator: SGLang's FIFO, all-or-nothing block policy, plus per-block ownership.

The original allocator appended any freed index to its free list, so a double free queued a block twice
and two later requests were handed the same rows (#14). These tests pin the policy the receiver relies
on (ceil(n/B) blocks, nothing or everything, FIFO reuse) and the ownership checks that turn a double,
foreign or duplicated free into an OwnershipError that changes nothing, so the pool's accounting
(free + owned == all blocks, no block with two owners) holds whatever sequence of calls is made.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epd_receiver.adapters.ports.allocator import OwningBlockAllocator
from epd_receiver.fsm import ContractError, OwnershipError

NUM_BLOCKS = 6
B = 4


@dataclass(frozen=True)
class Snapshot:
    free_count: int
    owned_count: int
    owners: dict[int, tuple[int, ...]]
    free_order: tuple[int, ...]


def snapshot(allocator: OwningBlockAllocator) -> Snapshot:
    """Everything about the pool, including the FIFO order in which alloc would hand out free blocks.

    The order is read from the private queue (read only): "no side effect" must include not reordering it.
    """
    return Snapshot(
        allocator.free_count,
        allocator.owned_count,
        allocator.owners(),
        tuple(allocator._free),
    )


def assert_accounting(allocator: OwningBlockAllocator) -> None:
    assert allocator.free_count + allocator.owned_count == allocator.num_blocks
    held = [b for blocks in allocator.owners().values() for b in blocks]
    assert len(held) == len(set(held)) == allocator.owned_count


@pytest.fixture
def allocator() -> OwningBlockAllocator:
    return OwningBlockAllocator(NUM_BLOCKS, B)


# ---- construction -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, B), (NUM_BLOCKS, 0), (-1, B), (NUM_BLOCKS, -2)])
def test_constructor_rejects_non_positive_geometry(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError):
        OwningBlockAllocator(num_blocks, block_size)


def test_fresh_pool_is_all_free_and_unowned(allocator: OwningBlockAllocator) -> None:
    assert allocator.num_blocks == NUM_BLOCKS
    assert allocator.block_size == B
    assert allocator.free_count == NUM_BLOCKS
    assert allocator.owned_count == 0
    assert allocator.owners() == {}


# ---- how many blocks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "blocks"),
    [(1, 1), (B - 1, 1), (B, 1), (B + 1, 2), (2 * B, 2), (2 * B + 1, 3), (NUM_BLOCKS * B, NUM_BLOCKS)],
)
def test_alloc_hands_out_ceil_tokens_over_b_blocks(allocator: OwningBlockAllocator, tokens: int, blocks: int) -> None:
    got = allocator.alloc(owner=1, tokens=tokens)

    assert got is not None
    assert len(got) == blocks == allocator.blocks_for(tokens)
    assert allocator.owned_by(1) == tuple(sorted(got))


@pytest.mark.parametrize("tokens", [0, -1, -B])
def test_alloc_of_non_positive_tokens_raises_without_side_effect(allocator: OwningBlockAllocator, tokens: int) -> None:
    allocator.alloc(owner=1, tokens=B)
    before = snapshot(allocator)

    with pytest.raises(ValueError):
        allocator.alloc(owner=2, tokens=tokens)

    assert snapshot(allocator) == before


# ---- all or nothing ---------------------------------------------------------------------------------


def test_alloc_when_short_returns_none_with_no_side_effect(allocator: OwningBlockAllocator) -> None:
    assert allocator.alloc(owner=1, tokens=4 * B) == (0, 1, 2, 3)
    before = snapshot(allocator)

    assert allocator.alloc(owner=2, tokens=2 * B + 1) is None

    assert snapshot(allocator) == before
    assert allocator.owned_by(2) == ()
    # What is left is still there for a request that fits.
    assert allocator.alloc(owner=2, tokens=2 * B) == (4, 5)


def test_alloc_of_more_than_the_whole_pool_returns_none(allocator: OwningBlockAllocator) -> None:
    assert allocator.alloc(owner=1, tokens=NUM_BLOCKS * B + 1) is None
    assert allocator.free_count == NUM_BLOCKS
    assert allocator.owners() == {}


# ---- FIFO -------------------------------------------------------------------------------------------


def test_fresh_pool_hands_out_blocks_in_index_order(allocator: OwningBlockAllocator) -> None:
    assert allocator.alloc(owner=1, tokens=2 * B) == (0, 1)
    assert allocator.alloc(owner=2, tokens=B) == (2,)
    assert allocator.alloc(owner=3, tokens=3 * B) == (3, 4, 5)


def test_exhausted_pool_hands_back_the_block_just_freed(allocator: OwningBlockAllocator) -> None:
    assert allocator.alloc(owner=1, tokens=NUM_BLOCKS * B) == tuple(range(NUM_BLOCKS))
    assert allocator.alloc(owner=2, tokens=1) is None

    allocator.free(owner=1, blocks=[0])

    assert allocator.alloc(owner=2, tokens=1) == (0,)


def test_freed_blocks_go_to_the_back_of_the_queue_in_the_order_given(allocator: OwningBlockAllocator) -> None:
    assert allocator.alloc(owner=1, tokens=4 * B) == (0, 1, 2, 3)

    allocator.free(owner=1, blocks=[3, 1])

    # Never-used blocks 4 and 5 come first, then the freed ones in the order they were freed.
    assert allocator.alloc(owner=2, tokens=3 * B) == (4, 5, 3)
    assert allocator.alloc(owner=3, tokens=B) == (1,)


# ---- ownership --------------------------------------------------------------------------------------


def test_free_returns_blocks_and_clears_ownership(allocator: OwningBlockAllocator) -> None:
    blocks = allocator.alloc(owner=7, tokens=3 * B)
    assert blocks is not None

    allocator.free(owner=7, blocks=blocks)

    assert allocator.owned_by(7) == ()
    assert allocator.owners() == {}
    assert allocator.free_count == NUM_BLOCKS


def test_double_free_raises_ownership_error_and_changes_nothing(allocator: OwningBlockAllocator) -> None:
    blocks = allocator.alloc(owner=1, tokens=2 * B)
    assert blocks is not None
    allocator.alloc(owner=2, tokens=B)
    allocator.free(owner=1, blocks=blocks)
    before = snapshot(allocator)

    with pytest.raises(OwnershipError):
        allocator.free(owner=1, blocks=blocks)

    assert snapshot(allocator) == before
    assert allocator.rejected_frees == 1
    # The block was not queued twice: the rest of the pool goes to distinct owners once each.
    first = allocator.alloc(owner=3, tokens=NUM_BLOCKS * B - B)
    assert first is not None
    assert len(set(first)) == len(first)
    assert allocator.alloc(owner=4, tokens=1) is None


def test_foreign_free_raises_and_leaves_the_owner_holding_its_blocks(allocator: OwningBlockAllocator) -> None:
    mine = allocator.alloc(owner=1, tokens=2 * B)
    assert mine is not None
    before = snapshot(allocator)

    with pytest.raises(OwnershipError):
        allocator.free(owner=2, blocks=[mine[0]])

    assert snapshot(allocator) == before
    assert allocator.owned_by(1) == mine


def test_free_mixing_own_and_foreign_blocks_frees_none_of_them(allocator: OwningBlockAllocator) -> None:
    mine = allocator.alloc(owner=1, tokens=2 * B)
    theirs = allocator.alloc(owner=2, tokens=B)
    assert mine is not None and theirs is not None
    before = snapshot(allocator)

    with pytest.raises(OwnershipError):
        allocator.free(owner=1, blocks=[*mine, *theirs])

    assert snapshot(allocator) == before


@pytest.mark.parametrize("block", [5, NUM_BLOCKS, -1], ids=["never_allocated", "past_the_end", "negative"])
def test_free_of_a_block_nobody_owns_raises(allocator: OwningBlockAllocator, block: int) -> None:
    allocator.alloc(owner=1, tokens=B)
    before = snapshot(allocator)

    with pytest.raises(OwnershipError):
        allocator.free(owner=1, blocks=[block])

    assert snapshot(allocator) == before


@pytest.mark.parametrize("duplicated", [[0, 0], [0, 1, 0], [1, 1, 1]])
def test_free_list_with_a_duplicate_index_raises_and_changes_nothing(
    allocator: OwningBlockAllocator, duplicated: list[int]
) -> None:
    assert allocator.alloc(owner=1, tokens=2 * B) == (0, 1)
    before = snapshot(allocator)

    with pytest.raises(OwnershipError):
        allocator.free(owner=1, blocks=duplicated)

    assert snapshot(allocator) == before
    assert allocator.owned_by(1) == (0, 1)


def test_ownership_error_is_a_contract_error_not_a_request_failure() -> None:
    assert issubclass(OwnershipError, ContractError)


def test_free_of_an_empty_list_is_a_no_op(allocator: OwningBlockAllocator) -> None:
    allocator.alloc(owner=1, tokens=B)
    before = snapshot(allocator)

    allocator.free(owner=1, blocks=[])

    assert snapshot(allocator) == before


# ---- accounting -------------------------------------------------------------------------------------


def test_owned_by_and_owners_report_sorted_blocks_per_room(allocator: OwningBlockAllocator) -> None:
    allocator.alloc(owner=1, tokens=3 * B)  # 0, 1, 2
    allocator.alloc(owner=2, tokens=B)  # 3
    allocator.free(owner=1, blocks=[1])
    allocator.alloc(owner=3, tokens=2 * B)  # 4, 5
    allocator.alloc(owner=1, tokens=B)  # 1, requeued at the back

    assert allocator.owned_by(1) == (0, 1, 2)
    assert allocator.owned_by(2) == (3,)
    assert allocator.owned_by(3) == (4, 5)
    assert allocator.owned_by(99) == ()
    assert allocator.owners() == {1: (0, 1, 2), 2: (3,), 3: (4, 5)}
    assert_accounting(allocator)


def test_free_plus_owned_is_always_the_pool_size_through_a_scripted_run(
    allocator: OwningBlockAllocator,
) -> None:
    assert_accounting(allocator)
    a = allocator.alloc(owner=1, tokens=5)
    assert_accounting(allocator)
    b = allocator.alloc(owner=2, tokens=9)
    assert_accounting(allocator)
    assert a is not None and b is not None
    allocator.free(owner=1, blocks=a)
    assert_accounting(allocator)
    with pytest.raises(OwnershipError):
        allocator.free(owner=1, blocks=a)
    assert_accounting(allocator)
    allocator.free(owner=2, blocks=b)
    assert_accounting(allocator)
    assert allocator.free_count == NUM_BLOCKS


# ---- property: any sequence of calls keeps the pool consistent --------------------------------------

ROOMS = 4

op_strategy = st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, ROOMS - 1), st.integers(-1, NUM_BLOCKS * B + B)),
    st.tuples(st.just("free"), st.integers(0, ROOMS - 1), st.integers(0, 10)),
    st.tuples(st.just("bad_free"), st.integers(0, ROOMS - 1), st.integers(0, NUM_BLOCKS - 1)),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op_strategy, max_size=40))
def test_random_alloc_free_sequences_keep_accounting_and_single_ownership(
    ops: list[tuple[str, int, int]],
) -> None:
    allocator = OwningBlockAllocator(NUM_BLOCKS, B)
    # The model: which allocations each room holds, and who holds each block right now.
    held: dict[int, list[tuple[int, ...]]] = {room: [] for room in range(ROOMS)}
    holder: dict[int, int] = {}

    for kind, room, arg in ops:
        if kind == "alloc":
            free_before = allocator.free_count
            if arg <= 0:
                with pytest.raises(ValueError):
                    allocator.alloc(room, arg)
                continue
            blocks = allocator.alloc(room, arg)
            needed = -(-arg // B)
            if blocks is None:
                assert needed > free_before
                assert allocator.free_count == free_before
                continue
            assert len(blocks) == needed
            assert len(set(blocks)) == len(blocks)
            for block in blocks:
                assert block not in holder, f"block {block} given to {room} while {holder[block]} holds it"
                holder[block] = room
            held[room].append(blocks)
        elif kind == "free":
            if not held[room]:
                continue
            blocks = held[room].pop(arg % len(held[room]))
            allocator.free(room, blocks)
            for block in blocks:
                del holder[block]
        else:  # a free the room is not entitled to: someone else's block, or one that is free
            if holder.get(arg) == room:
                continue
            before = snapshot(allocator)
            with pytest.raises(OwnershipError):
                allocator.free(room, [arg])
            assert snapshot(allocator) == before

        assert_accounting(allocator)
        assert allocator.owned_count == len(holder)
        assert allocator.owners() == {
            r: tuple(sorted(b for blocks in allocs for b in blocks)) for r, allocs in held.items() if allocs
        }
