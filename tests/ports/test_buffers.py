"""TorchBlockBuffers: the receive pool in SGLang's ``MultimodalDataBuffers`` layout.

These tests pin the byte layout a real sender writes into (per-block rows, M-RoPE packed as three runs of
n for a partial block, aux row with T and delta), and what the receiver's side does with it: gather in
list order into any offset of the output without touching the rest, copy the aux row by value, refuse to
read more tokens than the blocks hold, and never clear rows (stale data is a real hazard, not a bug to
paper over here). If any of this drifts, a payload is silently assembled from the wrong bytes.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass

import pytest
import torch

from epd_receiver.adapters.ports.buffers import AUX_INTS, TorchBlockBuffers
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.fsm import AuxRow

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


@pytest.fixture(params=[0, 2], ids=["no_deepstack", "deepstack_k2"])
def deepstack_layers(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def buffers(deepstack_layers: int) -> TorchBlockBuffers:
    return TorchBlockBuffers(NUM_BLOCKS, B, H, deepstack_layers)


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
