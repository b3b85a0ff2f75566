"""The digest the buffers compute while gathering equals the assembled payload's own digest.

At Success the controller hashes the whole payload for integrity and rank agreement. When it announced that
digest at ``new_payload``, ``TorchBlockBuffers`` hashes each piece of embedding rows as it copies it, round
after round, and the ids, positions and deepstack once the last row is in; ``checksum`` then answers
without reading the payload again. Whatever the rounds, the tail, the block size or the algorithm, the
answer must be the digest of what was assembled, and a gather that skips ahead must not be trusted.
"""

from __future__ import annotations

import copy

import pytest
import torch
from support.block_tokens import NUM_BLOCKS, B, H, make_tokens, write_tokens

from epd_receiver.adapters.ports import buffers as buffers_module
from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.payload import EmbeddingPayload, PayloadArena
from epd_receiver.fsm import ChecksumAlgorithm


class Recomputing(TorchBlockBuffers):
    """Counts the digests computed from the assembled payload rather than from the gathers."""

    recomputed = 0

    def checksum(self, payload: EmbeddingPayload, algorithm: ChecksumAlgorithm) -> int:
        streamed = payload.assembly_digest
        if streamed is None or streamed.value is None or streamed.algorithm is not algorithm:
            self.recomputed += 1
        return super().checksum(payload, algorithm)


def assemble(
    buffers: TorchBlockBuffers, rounds: list[int], algorithm: ChecksumAlgorithm | None, seed: int = 0
) -> EmbeddingPayload:
    """A payload of sum(rounds) tokens landing in rounds of the given sizes, each written into fresh blocks
    of the pool (in a scrambled order) and gathered at its offset, as the controller does."""
    total = sum(rounds)
    tokens = make_tokens(total, buffers.deepstack_layers, seed)
    payload = buffers.new_payload(total, 3, algorithm)
    at = 0
    for n in rounds:
        blocks = list(reversed(range(-(-n // B))))
        write_tokens(buffers, blocks, tokens.slice(at, at + n))
        buffers.gather(blocks, n, payload, at)
        at += n
    return payload


@pytest.mark.parametrize("algorithm", list(ChecksumAlgorithm), ids=lambda a: a.name)
@pytest.mark.parametrize("rounds", [[8], [5], [8, 8, 3], [4, 1, 7]], ids=str)
def test_the_streamed_digest_is_the_payloads(
    deepstack_layers: int, algorithm: ChecksumAlgorithm, rounds: list[int]
) -> None:
    buffers = Recomputing(NUM_BLOCKS, B, H, deepstack_layers)
    payload = assemble(buffers, rounds, algorithm)

    assert payload.assembly_digest is not None and payload.assembly_digest.value is not None
    assert buffers.checksum(payload, algorithm) == payload.digest(algorithm)
    assert buffers.recomputed == 0


def test_pieces_smaller_than_a_block_hash_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A row is hashed in several pieces when it is larger than a piece (2 rows of 16 bytes here)."""
    monkeypatch.setattr(buffers_module, "_HASHED_PIECE_BYTES", 2 * H * 2)
    buffers = Recomputing(NUM_BLOCKS, B, H)
    payload = assemble(buffers, [7, 6], ChecksumAlgorithm.XXH3_64)
    assert buffers.checksum(payload, ChecksumAlgorithm.XXH3_64) == payload.digest()
    assert buffers.recomputed == 0


def test_no_digest_announced_means_none_streamed_and_one_computed_when_asked() -> None:
    buffers = Recomputing(NUM_BLOCKS, B, H)
    payload = assemble(buffers, [6, 3], None)
    assert payload.assembly_digest is None
    assert buffers.checksum(payload, ChecksumAlgorithm.CRC32) == payload.digest(ChecksumAlgorithm.CRC32)
    assert buffers.recomputed == 1


def test_another_algorithm_than_announced_is_computed_afresh() -> None:
    buffers = Recomputing(NUM_BLOCKS, B, H)
    payload = assemble(buffers, [6], ChecksumAlgorithm.XXH3_64)
    assert buffers.checksum(payload, ChecksumAlgorithm.CRC32) == payload.digest(ChecksumAlgorithm.CRC32)
    assert buffers.recomputed == 1


def test_a_gather_out_of_order_leaves_the_digest_to_be_computed() -> None:
    """Rows gathered after a gap, or again, cannot be streamed in order: the digest is never guessed."""
    buffers = Recomputing(NUM_BLOCKS, B, H)
    tokens = make_tokens(8, 0)
    write_tokens(buffers, [0, 1], tokens)
    payload = buffers.new_payload(8, 0, ChecksumAlgorithm.XXH3_64)
    buffers.gather([1], 4, payload, 4)  # the second half first
    buffers.gather([0], 4, payload, 0)
    assert payload.assembly_digest is not None and payload.assembly_digest.value is None
    assert buffers.checksum(payload, ChecksumAlgorithm.XXH3_64) == payload.digest()
    assert buffers.recomputed == 1


def test_an_arena_payload_taken_again_starts_a_fresh_digest() -> None:
    arena = PayloadArena(H)
    buffers = Recomputing(NUM_BLOCKS, B, H, arena=arena)
    first = assemble(buffers, [8], ChecksumAlgorithm.XXH3_64, seed=1)
    expected_first = first.digest()
    buffers.recycle(first)
    del first
    second = assemble(buffers, [8], ChecksumAlgorithm.XXH3_64, seed=2)
    assert arena.reused == 1
    assert buffers.checksum(second, ChecksumAlgorithm.XXH3_64) == second.digest() != expected_first
    assert buffers.recomputed == 0


def test_the_copy_that_hashes_copies_what_the_plain_gather_does(deepstack_layers: int) -> None:
    plain = assemble(TorchBlockBuffers(NUM_BLOCKS, B, H, deepstack_layers), [8, 8, 3], None, seed=4)
    hashed = assemble(TorchBlockBuffers(NUM_BLOCKS, B, H, deepstack_layers), [8, 8, 3], ChecksumAlgorithm.CRC32, seed=4)
    for a, b in zip(plain.digest_parts(), hashed.digest_parts(), strict=True):
        assert torch.equal(a, b)


def test_a_copy_of_a_payload_mid_assembly_goes_on_alone() -> None:
    """The explorer copies whole worlds (deepcopy), payloads mid-assembly included: each copy's digest goes on
    from where the original stood, and neither disturbs the other."""
    buffers = Recomputing(NUM_BLOCKS, B, H)
    tokens = make_tokens(8, 0)
    write_tokens(buffers, [0, 1], tokens)
    payload = buffers.new_payload(8, 0, ChecksumAlgorithm.XXH3_64)
    buffers.gather([0], 4, payload, 0)
    twin = copy.deepcopy(payload)
    for each in (payload, twin):
        buffers.gather([1], 4, each, 4)
        assert buffers.checksum(each, ChecksumAlgorithm.XXH3_64) == each.digest()
    assert buffers.recomputed == 0


def test_a_copy_of_the_pool_gathers_and_hashes_its_own_rows() -> None:
    """A deepcopy of the pool (the explorer's fork of a world) hashes what its own rows hold, never the rows of
    the pool it was copied from."""
    original = TorchBlockBuffers(NUM_BLOCKS, B, H)
    twin = copy.deepcopy(original)
    write_tokens(twin, [0], make_tokens(3, 0, seed=5))
    payload = twin.new_payload(3, 0, ChecksumAlgorithm.XXH3_64)
    twin.gather([0], 3, payload, 0)
    assert twin.checksum(payload, ChecksumAlgorithm.XXH3_64) == payload.digest()
    assert torch.equal(payload.embeddings, twin.embeddings[0, : 3 * H].view(3, H))
