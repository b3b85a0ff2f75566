"""TorchBlockBuffers: the receive pool in SGLang's ``MultimodalDataBuffers`` layout.

These tests pin the byte layout a real sender writes into (per-block rows, M-RoPE packed as three runs of
n for a partial block, the deepstack part of a row, aux row with T and delta, the buffer infos a transport
registers), that the aux row is read by value, and that rows are never cleared (stale data is a real
hazard, not a bug to paper over here). If any of this drifts, a payload is silently assembled from the
wrong bytes. What the receiver's side reads out of the rows is pinned in ``test_buffer_gather.py``.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest
import torch
from support.block_tokens import NUM_BLOCKS, B, H, make_tokens, write_tokens

from epd_receiver.adapters.ports.buffers import AUX_INTS, TorchBlockBuffers
from epd_receiver.fsm import AuxRow

# ---- shapes and construction ------------------------------------------------------------------------


def test_pool_shapes_and_dtypes_follow_the_sglang_layout(buffers: TorchBlockBuffers, deepstack_layers: int) -> None:
    assert buffers.embeddings.shape == (NUM_BLOCKS, B * H)
    assert buffers.embeddings.dtype == torch.bfloat16
    assert buffers.fill_ids.shape == (NUM_BLOCKS, B)
    assert buffers.fill_ids.dtype == torch.int32
    assert buffers.mrope_positions.shape == (NUM_BLOCKS, 3 * B)
    assert buffers.mrope_positions.dtype == torch.int32
    assert buffers.aux.shape == (NUM_BLOCKS, AUX_INTS) == (NUM_BLOCKS, 16)
    assert buffers.aux.dtype == torch.int32
    if deepstack_layers:
        assert buffers.deepstack is not None
        assert buffers.deepstack.shape == (NUM_BLOCKS, B * H * deepstack_layers)
        assert buffers.deepstack.dtype == torch.bfloat16
    else:
        assert buffers.deepstack is None


@pytest.mark.parametrize(
    ("num_blocks", "block_size", "hidden", "layers"),
    [(0, B, H, 0), (NUM_BLOCKS, 0, H, 0), (NUM_BLOCKS, B, 0, 0), (NUM_BLOCKS, B, H, -1)],
)
def test_constructor_rejects_non_positive_geometry(num_blocks: int, block_size: int, hidden: int, layers: int) -> None:
    with pytest.raises(ValueError):
        TorchBlockBuffers(num_blocks, block_size, hidden, layers)


@pytest.mark.parametrize("n", [0, B + 1])
def test_write_block_rejects_empty_or_oversized_blocks(n: int) -> None:
    buffers = TorchBlockBuffers(NUM_BLOCKS, B, H)
    tokens = make_tokens(n, 0)
    with pytest.raises(ValueError):
        buffers.write_block(0, tokens.embeddings, tokens.fill_ids, tokens.mrope)


# ---- partial block layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, B - 1])
def test_partial_block_packs_mrope_as_three_consecutive_runs_of_n(n: int) -> None:
    buffers = TorchBlockBuffers(NUM_BLOCKS, B, H)
    tokens = make_tokens(n, 0)
    buffers.write_block(3, tokens.embeddings, tokens.fill_ids, tokens.mrope)

    row = buffers.mrope_positions[3]
    p0, p1, p2 = tokens.mrope
    assert torch.equal(row[: 3 * n], torch.cat([p0, p1, p2]))
    assert torch.equal(row[3 * n :], torch.zeros(3 * B - 3 * n, dtype=torch.int32))
    # Not the (0, B, 2B) layout of a full block: p1 and p2 are not at offsets B and 2B.
    assert not torch.equal(row[B : B + n], p1)
    assert not torch.equal(row[2 * B : 2 * B + n], p2)

    assert torch.equal(buffers.fill_ids[3, :n], tokens.fill_ids)
    assert torch.equal(buffers.embeddings[3, : n * H].view(n, H), tokens.embeddings)


def test_full_block_puts_the_three_runs_at_offsets_0_b_2b() -> None:
    buffers = TorchBlockBuffers(NUM_BLOCKS, B, H)
    tokens = make_tokens(B, 0)
    buffers.write_block(1, tokens.embeddings, tokens.fill_ids, tokens.mrope)

    row = buffers.mrope_positions[1]
    for k in range(3):
        assert torch.equal(row[k * B : (k + 1) * B], tokens.mrope[k])


# ---- deepstack --------------------------------------------------------------------------------------


def test_write_block_without_deepstack_zeroes_the_deepstack_part_of_the_row() -> None:
    k = 2
    buffers = TorchBlockBuffers(NUM_BLOCKS, B, H, k)
    first = make_tokens(B, k, seed=1)
    write_tokens(buffers, [0], first)

    second = make_tokens(B, 0, seed=2)
    buffers.write_block(0, second.embeddings, second.fill_ids, second.mrope, None)

    assert buffers.deepstack is not None
    assert bool((buffers.deepstack[0] == 0).all())


# ---- buffer infos -----------------------------------------------------------------------------------


def test_get_buf_infos_lists_pointers_and_lengths_in_sglang_order(
    buffers: TorchBlockBuffers, deepstack_layers: int
) -> None:
    pointers, data_lens, item_lens = buffers.get_buf_infos()

    expected_tensors = [buffers.embeddings, buffers.fill_ids, buffers.mrope_positions, buffers.aux]
    expected_items = [B * H * 2, B * 4, 3 * B * 4, 64]
    if deepstack_layers:
        assert buffers.deepstack is not None
        expected_tensors.append(buffers.deepstack)
        expected_items.append(B * H * deepstack_layers * 2)

    assert pointers == [t.data_ptr() for t in expected_tensors]
    assert item_lens == expected_items
    assert data_lens == [NUM_BLOCKS * item for item in expected_items]
    assert len(pointers) == len(data_lens) == len(item_lens) == (5 if deepstack_layers else 4)


def test_buf_info_pointers_address_rows_at_item_len_strides(buffers: TorchBlockBuffers) -> None:
    pointers, _, item_lens = buffers.get_buf_infos()
    for tensor, pointer, item in zip(buffers.buffers(), pointers, item_lens, strict=True):
        assert tensor.is_contiguous()
        assert tensor[3].data_ptr() == pointer + 3 * item


# ---- aux row ----------------------------------------------------------------------------------------


def test_read_aux_returns_plain_ints() -> None:
    buffers = TorchBlockBuffers(NUM_BLOCKS, B, H)
    buffers.write_aux(2, total_tokens=1234, mrope_delta=-56)

    aux = buffers.read_aux(2)

    assert aux == AuxRow(total_tokens=1234, mrope_delta=-56)
    assert type(aux.total_tokens) is int
    assert type(aux.mrope_delta) is int


def test_read_aux_is_a_copy_that_survives_a_later_overwrite_of_the_row() -> None:
    buffers = TorchBlockBuffers(NUM_BLOCKS, B, H)
    buffers.write_aux(4, total_tokens=100, mrope_delta=7)
    aux = buffers.read_aux(4)

    buffers.write_aux(4, total_tokens=999, mrope_delta=-3)
    buffers.aux[4].fill_(42)

    assert aux.total_tokens == 100
    assert aux.mrope_delta == 7
    with pytest.raises(FrozenInstanceError):
        aux.total_tokens = 5  # type: ignore[misc]


def test_write_aux_touches_only_the_first_two_ints_of_one_row() -> None:
    buffers = TorchBlockBuffers(NUM_BLOCKS, B, H)
    buffers.write_aux(1, total_tokens=77, mrope_delta=-8)

    assert buffers.aux[1, :2].tolist() == [77, -8]
    assert bool((buffers.aux[1, 2:] == 0).all())
    others = torch.cat([buffers.aux[:1], buffers.aux[2:]])
    assert bool((others == 0).all())


# ---- rows are never cleared -------------------------------------------------------------------------


def test_a_stale_aux_row_survives_later_data_writes_to_the_same_block() -> None:
    buffers = TorchBlockBuffers(NUM_BLOCKS, B, H)
    # An earlier request's first block carried its aux row...
    buffers.write_aux(5, total_tokens=300, mrope_delta=11)
    # ...then the block is reused for data only (e.g. a resume chunk), which writes no aux.
    tokens = make_tokens(B, 0, seed=3)
    buffers.write_block(5, tokens.embeddings, tokens.fill_ids, tokens.mrope)

    assert buffers.read_aux(5) == AuxRow(total_tokens=300, mrope_delta=11)


def test_a_shorter_write_leaves_the_tail_of_an_earlier_full_write_in_the_row() -> None:
    buffers = TorchBlockBuffers(NUM_BLOCKS, B, H)
    old = make_tokens(B, 0, seed=4)
    buffers.write_block(2, old.embeddings, old.fill_ids, old.mrope)
    old_row_fill = buffers.fill_ids[2].clone()

    new = make_tokens(1, 0, seed=5)
    buffers.write_block(2, new.embeddings, new.fill_ids, new.mrope)

    assert torch.equal(buffers.fill_ids[2, :1], new.fill_ids)
    assert torch.equal(buffers.fill_ids[2, 1:], old_row_fill[1:])
    assert torch.equal(buffers.embeddings[2, H:].view(B - 1, H), old.embeddings[1:])
    # M-RoPE: the new 3 ints are packed at the start; the old row's ints from 3 on are still there.
    assert torch.equal(buffers.mrope_positions[2, :3], new.mrope.reshape(-1))
    assert torch.equal(buffers.mrope_positions[2, 3:], old.mrope.reshape(-1)[3:])
