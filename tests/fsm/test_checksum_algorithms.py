"""The aux row names the checksum's algorithm (slot 2: 1 CRC32, 2 xxh3-64), and one pass serves both checks.

A sender of either algorithm verifies, and a corrupted payload fails IntegrityError under each; an id the
receiver does not know fails that request with CorruptAux, its blocks returned. At Success the payload's
digest is computed once, however many of `agree_on_payload` and `verify_checksum` run.
"""

from __future__ import annotations

import pytest
from support.controller_bench import Bench, D, assert_failed_cleanly
from support.fakes import FakePayload, PeerRank

from epd_receiver.adapters.ports.allocator import OwningBlockAllocator
from epd_receiver.adapters.ports.buffers import CHECKSUM, CHECKSUM_ALGORITHM, CHECKSUM_HIGH, TorchBlockBuffers
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.adapters.ports.sender import InProcessSender
from epd_receiver.fsm import (
    AuxRow,
    ChecksumAlgorithm,
    CorruptAux,
    IntegrityError,
    KVPoll,
    ReceiverConfig,
    ReceiverQueue,
    ReceiverRequest,
    State,
)

B = 4
BLOCKS = 8
CRC32, XXH3 = ChecksumAlgorithm.CRC32, ChecksumAlgorithm.XXH3_64


class CountingPool(TorchBlockBuffers):
    """The real pool, counting the payload digests it is asked for."""

    def __init__(self) -> None:
        super().__init__(BLOCKS, B, 8)
        self.digests: list[ChecksumAlgorithm] = []

    def checksum(self, payload: EmbeddingPayload, algorithm: ChecksumAlgorithm) -> int:
        self.digests.append(algorithm)
        return super().checksum(payload, algorithm)


def one_request(
    total: int, algorithm: ChecksumAlgorithm, *, corrupt: bool = False, aux_slot_2: int | None = None
) -> tuple[CountingPool, ReceiverRequest[EmbeddingPayload], InProcessSender]:
    """Room 1 of ``total`` tokens from a sender checksumming with ``algorithm``, run to its end."""
    pool = CountingPool()
    sender = InProcessSender(pool, bank_rows=64)
    queue: ReceiverQueue[EmbeddingPayload] = ReceiverQueue(
        pool, OwningBlockAllocator(BLOCKS, B), ReceiverConfig(default_alloc_tokens=2 * B)
    )
    request = queue.add(1, sender.add_room(1, total, checksum=True, checksum_algorithm=algorithm))
    for _ in range(8):
        queue.step()
        if request.first_block is not None and sender.deliver(1):
            if corrupt:
                corrupt, block = False, sender.room_messages(1)[-1].blocks[0]
                pool.embeddings[block, 0] = pool.embeddings[block, 0] + 1
            if aux_slot_2 is not None:
                pool.aux[request.first_block, CHECKSUM_ALGORITHM] = aux_slot_2
        if request.state in (State.SUCCESS, State.FAILED):
            break
    return pool, request, sender


@pytest.mark.parametrize("total", [2 * B, 5 * B + 1], ids=["fits", "resumed"])
@pytest.mark.parametrize("algorithm", list(ChecksumAlgorithm), ids=lambda a: a.name)
def test_a_sender_of_either_algorithm_verifies_with_one_digest(algorithm: ChecksumAlgorithm, total: int) -> None:
    pool, request, sender = one_request(total, algorithm)

    assert request.state is State.SUCCESS, request.error
    assert request.payload is not None and sender.source(1).mismatches(request.payload) == []
    assert request.checksum == sender.source(1).checksum == request.payload.digest(algorithm)
    assert request.checksum_algorithm == algorithm
    assert pool.digests == [algorithm]  # the sender's algorithm, once


def test_the_aux_row_carries_the_algorithm_and_all_64_bits() -> None:
    pool = TorchBlockBuffers(2, B, 8)
    pool.write_aux(1, 9, -3, 0xFEDC_BA98_7654_3210, XXH3)
    assert pool.aux[1, :5].tolist() == [9, -3, 2, 0x76543210, 0xFEDCBA98 - (1 << 32)]
    assert pool.read_aux(1) == AuxRow(9, -3, checksum=0xFEDC_BA98_7654_3210, checksum_algorithm=XXH3)
    pool.write_aux(1, 9, -3, 0xDEADBEEF, CRC32)
    assert pool.aux[1, CHECKSUM_ALGORITHM] == 1 and pool.aux[1, CHECKSUM_HIGH] == 0
    assert pool.read_aux(1) == AuxRow(9, -3, checksum=0xDEADBEEF, checksum_algorithm=CRC32)
    pool.write_aux(1, 9, -3)
    assert pool.aux[1, 2:5].tolist() == [0, 0, 0] and pool.read_aux(1).checksum is None


@pytest.mark.parametrize("total", [2 * B, 5 * B + 1], ids=["fits", "resumed"])
@pytest.mark.parametrize("algorithm", list(ChecksumAlgorithm), ids=lambda a: a.name)
def test_a_corrupted_payload_fails_integrity_under_either_algorithm(algorithm: ChecksumAlgorithm, total: int) -> None:
    pool, request, _ = one_request(total, algorithm, corrupt=True)

    assert request.state is State.FAILED
    assert isinstance(request.error, IntegrityError) and request.error.room == 1
    assert algorithm.name in str(request.error)
    assert pool.digests == [algorithm]


@pytest.mark.parametrize("unknown", [3, 255, -1])
def test_an_unknown_algorithm_fails_that_request_as_corrupt_aux(unknown: int) -> None:
    pool, request, _ = one_request(2 * B, XXH3, aux_slot_2=unknown)

    assert request.state is State.FAILED
    assert isinstance(request.error, CorruptAux) and request.error.room == 1
    assert f"algorithm {unknown}" in str(request.error)
    assert pool.digests == []  # judged before anything is hashed


def test_an_unknown_algorithm_is_judged_on_the_fake_pool_too() -> None:
    bench = Bench.make()
    request = bench.add(1)
    bench.step()
    bench.buffers.aux[0] = AuxRow(D, 7, checksum=0x1234, checksum_algorithm=7)
    bench.links[1].status = KVPoll.Success
    bench.step()
    assert_failed_cleanly(bench, request, CorruptAux)
    assert "algorithm 7" in str(request.error)


@pytest.mark.parametrize("algorithm", [None, *ChecksumAlgorithm], ids=lambda a: "none" if a is None else a.name)
def test_two_ranks_and_a_checksum_share_one_digest_per_success(algorithm: ChecksumAlgorithm | None) -> None:
    peer = PeerRank()
    bench = Bench.make(ranks=peer)
    request = bench.add(1)
    bench.step()
    hashed_with = XXH3 if algorithm is None else algorithm
    expected = bench.buffers.checksum(FakePayload(D, 7, [0] * 4 + [1] * 4), hashed_with)  # A0 = (0, 1)
    bench.buffers.digests.clear()
    checksum = None if algorithm is None else expected
    bench.buffers.aux[0] = AuxRow(D, 7, checksum=checksum, checksum_algorithm=hashed_with)
    bench.links[1].status = KVPoll.Success
    bench.step()

    assert request.state is State.SUCCESS, request.error
    assert bench.buffers.digests == [hashed_with]  # agree_on_payload and verify_checksum: one pass
    assert peer.calls.count("same") == 2  # the aux row's agreement, then the payload's


def test_the_stale_slots_cleared_include_the_digest_high_bits() -> None:
    pool = TorchBlockBuffers(2, B, 8)
    pool.aux[1, CHECKSUM_ALGORITHM], pool.aux[1, CHECKSUM], pool.aux[1, CHECKSUM_HIGH] = 2, 5, 6
    pool.clear_checksum(1)
    assert pool.aux[1, 2:].tolist() == [0] * 14 and pool.read_aux(1).checksum is None


@pytest.mark.parametrize(
    ("ranks", "compare_payloads", "algorithm", "announced"),
    [
        (1, True, None, None),  # nothing will ask: the gathers need not hash
        (1, True, CRC32, CRC32),  # the sender's algorithm, for integrity
        (2, True, None, XXH3),  # the default, for the ranks' comparison
        (2, True, CRC32, CRC32),  # one digest serves both
        (2, False, None, None),
    ],
)
def test_the_payload_is_told_at_its_start_which_digest_success_will_ask_for(
    ranks: int, compare_payloads: bool, algorithm: ChecksumAlgorithm | None, announced: ChecksumAlgorithm | None
) -> None:
    bench = Bench.make(ranks=PeerRank() if ranks == 2 else None, compare_payloads=compare_payloads)
    request = bench.add(1)
    bench.step()
    checksum = None if algorithm is None else 0x1234
    bench.buffers.aux[0] = AuxRow(D, 7, checksum=checksum, checksum_algorithm=algorithm or XXH3)
    bench.links[1].status = KVPoll.Success
    bench.step()

    assert bench.buffers.digests_announced == [announced]
    assert bench.buffers.digests == ([] if announced is None else [announced])  # what was announced is asked
    assert request.state is (State.FAILED if checksum else State.SUCCESS)  # 0x1234 is no payload's digest
