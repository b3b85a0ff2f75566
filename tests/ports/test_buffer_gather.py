"""TorchBlockBuffers' gather: how the receiver's side assembles a payload out of the pool's rows.

Blocks are read in list order into any offset of the output without touching the rest, a partial last
block from its packed layout, deepstack joined to the embeddings, and never more tokens than the blocks
hold. The rows' own layout is pinned in ``test_buffers.py``.
"""

from __future__ import annotations

import pytest
import torch
from support.block_tokens import NUM_BLOCKS, B, H, Tokens, make_tokens, write_tokens

from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.payload import EmbeddingPayload


def assert_payload_matches(payload: EmbeddingPayload, tokens: Tokens, at: int = 0) -> None:
    span = slice(at, at + tokens.n)
    assert torch.equal(payload.embeddings[span], tokens.embeddings)
    assert torch.equal(payload.fill_ids[span], tokens.fill_ids)
    assert torch.equal(payload.mrope_positions[:, span], tokens.mrope)
    if tokens.deepstack is None:
        assert payload.deepstack is None
    else:
        assert payload.deepstack is not None
        assert torch.equal(payload.deepstack[span], tokens.deepstack)


def fill_sentinel(payload: EmbeddingPayload) -> None:
    payload.embeddings.fill_(-7.0)
    payload.fill_ids.fill_(-1)
    payload.mrope_positions.fill_(-2)
    if payload.deepstack is not None:
        payload.deepstack.fill_(-9.0)


# ---- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "blocks",
    [[5, 2, 7], [3, 0], [6, 1, 4, 0], [7]],
    ids=["5-2-7", "3-0", "6-1-4-0", "7"],
)
@pytest.mark.parametrize("short_by", [0, 1, B - 1], ids=["full", "tail_b_minus_1", "tail_1"])
def test_gather_round_trips_non_contiguous_unsorted_blocks_in_list_order(
    buffers: TorchBlockBuffers, deepstack_layers: int, blocks: list[int], short_by: int
) -> None:
    n = len(blocks) * B - short_by
    tokens = make_tokens(n, deepstack_layers)
    write_tokens(buffers, blocks, tokens)

    payload = buffers.new_payload(n, mrope_delta=0)
    buffers.gather(blocks, n, payload, at=0)

    assert_payload_matches(payload, tokens)


def test_gather_follows_list_order_not_block_index_order(buffers: TorchBlockBuffers, deepstack_layers: int) -> None:
    tokens = make_tokens(2 * B, deepstack_layers)
    write_tokens(buffers, [6, 1], tokens)

    payload = buffers.new_payload(2 * B, 0)
    buffers.gather([1, 6], 2 * B, payload, at=0)

    swapped = Tokens(
        torch.cat([tokens.embeddings[B:], tokens.embeddings[:B]]),
        torch.cat([tokens.fill_ids[B:], tokens.fill_ids[:B]]),
        torch.cat([tokens.mrope[:, B:], tokens.mrope[:, :B]], dim=1),
        None if tokens.deepstack is None else torch.cat([tokens.deepstack[B:], tokens.deepstack[:B]]),
    )
    assert_payload_matches(payload, swapped)


def test_gather_of_fewer_whole_blocks_than_the_list_holds_reads_only_a_prefix(
    buffers: TorchBlockBuffers,
) -> None:
    tokens = make_tokens(3 * B, buffers.deepstack_layers)
    write_tokens(buffers, [4, 0, 2], tokens)

    wanted = 2 * B
    payload = buffers.new_payload(wanted, 0)
    buffers.gather([4, 0, 2], wanted, payload, at=0)

    assert_payload_matches(payload, tokens.slice(0, wanted))


# ---- a partial last block ---------------------------------------------------------------------------


def test_gather_reads_a_partial_last_block_from_its_packed_layout(deepstack_layers: int) -> None:
    buffers = TorchBlockBuffers(NUM_BLOCKS, B, H, deepstack_layers)
    n = 2 * B + 3
    tokens = make_tokens(n, deepstack_layers)
    write_tokens(buffers, [2, 7, 5], tokens)

    payload = buffers.new_payload(n, 0)
    buffers.gather([2, 7, 5], n, payload, at=0)

    assert_payload_matches(payload, tokens)


# ---- gather at an offset ----------------------------------------------------------------------------


@pytest.mark.parametrize("tokens_n", [B, B + 3, 3], ids=["one_full_block", "full_plus_tail", "tail_only"])
def test_gather_at_nonzero_offset_leaves_the_rest_of_the_output_untouched(
    buffers: TorchBlockBuffers, deepstack_layers: int, tokens_n: int
) -> None:
    at, after = 5, 4
    total = at + tokens_n + after
    blocks = [6, 3][: -(-tokens_n // B)]
    tokens = make_tokens(tokens_n, deepstack_layers)
    write_tokens(buffers, blocks, tokens)

    payload = buffers.new_payload(total, 0)
    fill_sentinel(payload)
    buffers.gather(blocks, tokens_n, payload, at=at)

    assert_payload_matches(payload, tokens, at=at)
    for outside in (slice(0, at), slice(at + tokens_n, total)):
        assert bool((payload.embeddings[outside] == -7.0).all())
        assert bool((payload.fill_ids[outside] == -1).all())
        assert bool((payload.mrope_positions[:, outside] == -2).all())
        if payload.deepstack is not None:
            assert bool((payload.deepstack[outside] == -9.0).all())


def test_two_gathers_assemble_one_payload_like_a_first_chunk_and_a_resume(deepstack_layers: int) -> None:
    buffers = TorchBlockBuffers(NUM_BLOCKS, B, H, deepstack_layers)
    total = 3 * B + 2
    tokens = make_tokens(total, deepstack_layers)

    write_tokens(buffers, [4, 1], tokens.slice(0, 2 * B))
    payload = buffers.new_payload(total, 0)
    buffers.gather([4, 1], 2 * B, payload, at=0)

    # The second stage reuses a freed block (1) and a fresh one (0).
    write_tokens(buffers, [1, 0], tokens.slice(2 * B, total))
    buffers.gather([1, 0], total - 2 * B, payload, at=2 * B)

    assert_payload_matches(payload, tokens)


# ---- deepstack --------------------------------------------------------------------------------------


def test_deepstack_present_is_gathered_and_joined_into_input_embeds() -> None:
    k = 2
    buffers = TorchBlockBuffers(NUM_BLOCKS, B, H, k)
    n = B + 1
    tokens = make_tokens(n, k)
    write_tokens(buffers, [3, 5], tokens)

    payload = buffers.new_payload(n, 0)
    buffers.gather([3, 5], n, payload, at=0)

    assert payload.deepstack is not None
    assert payload.deepstack.shape == (n, H * k)
    assert tokens.deepstack is not None
    assert torch.equal(payload.deepstack, tokens.deepstack)
    assert torch.equal(payload.input_embeds(), torch.cat([tokens.embeddings, tokens.deepstack], dim=-1))


def test_deepstack_absent_means_no_pool_tensor_and_no_payload_tensor() -> None:
    buffers = TorchBlockBuffers(NUM_BLOCKS, B, H, 0)
    tokens = make_tokens(B, 0)
    write_tokens(buffers, [2], tokens)

    payload = buffers.new_payload(B, 0)
    buffers.gather([2], B, payload, at=0)

    assert buffers.deepstack is None
    assert len(buffers.buffers()) == 4
    assert payload.deepstack is None
    assert payload.input_embeds() is payload.embeddings


# ---- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blocks", "tokens"),
    [([0], B + 1), ([0, 1], 2 * B + 1), ([3, 1], 3 * B), ([], 1)],
    ids=["one_block_plus_one", "two_blocks_plus_one", "a_whole_block_more", "no_blocks"],
)
def test_gather_of_more_tokens_than_the_blocks_hold_raises(
    buffers: TorchBlockBuffers, blocks: list[int], tokens: int
) -> None:
    payload = buffers.new_payload(4 * B, 0)
    with pytest.raises(ValueError):
        buffers.gather(blocks, tokens, payload, at=0)


def test_gather_of_exactly_the_capacity_is_accepted(buffers: TorchBlockBuffers) -> None:
    tokens = make_tokens(2 * B, buffers.deepstack_layers)
    write_tokens(buffers, [7, 0], tokens)
    payload = buffers.new_payload(2 * B, 0)

    buffers.gather([7, 0], 2 * B, payload, at=0)

    assert_payload_matches(payload, tokens)
