"""A checksum an earlier request left in a pool row is never read as the current request's.

The aux row of A0[0] carries T and the M-RoPE delta in slots 0-1, and our senders add a digest of the
payload in slots 2-4 (the algorithm's id, then the digest's low and high 32 bits). The pool is never
cleared between requests, and SGLang's Encode side writes slots 0-1 only: a block that was A0[0] of a
checksummed request, reused as A0[0] by such a sender, would still carry the old algorithm and checksum,
and a good payload would fail IntegrityError. The controller clears A0[0]'s checksum slots when it takes
A0, before the init names the block to any sender.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from epd_receiver.adapters.ports.allocator import OwningBlockAllocator
from epd_receiver.adapters.ports.buffers import CHECKSUM, CHECKSUM_ALGORITHM, CHECKSUM_HIGH, TorchBlockBuffers
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.adapters.ports.sender import InProcessSender
from epd_receiver.adapters.ports.sender_links import SenderLink
from epd_receiver.fsm import ChecksumAlgorithm, ReceiverConfig, ReceiverQueue, State

B = 4
D = 2 * B


class ForkAuxPool(TorchBlockBuffers):
    """A pool whose sender writes the aux row as SGLang's Encode side does while ``slots_zero_one_only`` is
    set, and our own senders' full aux row (checksum included) otherwise.

    The fork's ``MultimodalDataBuffers.set_buf`` (ZhengWG/sglang cca20b0,
    python/sglang/srt/disaggregation/utils.py:760-770) writes, for the first block only, slot 0 = the
    embedding length and slot 1 = the M-RoPE delta when the request has one (every request here does),
    and nothing else of the row: slots 2-15 keep whatever an earlier request left there."""

    slots_zero_one_only = False

    def write_aux(
        self,
        block: int,
        total_tokens: int,
        mrope_delta: int,
        checksum: int | None = None,
        algorithm: int = ChecksumAlgorithm.XXH3_64,
    ) -> None:
        if not self.slots_zero_one_only:
            super().write_aux(block, total_tokens, mrope_delta, checksum, algorithm)
            return
        self.aux[block, 0] = total_tokens
        self.aux[block, 1] = mrope_delta


def test_a_block_reused_as_a0_by_a_sender_that_writes_no_checksum_is_not_judged_by_a_stale_one() -> None:
    pool = ForkAuxPool(2, B, 8)  # room for one A0 only: the second request must reuse the first one's rows
    sender = InProcessSender(pool, bank_rows=64)
    queue: ReceiverQueue[EmbeddingPayload] = ReceiverQueue(
        pool, OwningBlockAllocator(2, B), ReceiverConfig(default_alloc_tokens=D)
    )
    first = queue.add(1, sender.add_room(1, D, checksum=True))
    queue.step()
    sender.deliver(1)
    queue.step()
    assert first.state is State.SUCCESS and first.checksum is not None  # checked, and it matched
    block = first.first_block
    queue.release(1)
    assert (
        block is not None and pool.aux[block, CHECKSUM_ALGORITHM] == ChecksumAlgorithm.XXH3_64
    )  # the pool keeps it: never cleared

    pool.slots_zero_one_only = True
    second = queue.add(2, sender.add_room(2, D))
    queue.step()
    assert second.first_block == block
    sender.deliver(2)
    queue.step()

    assert second.state is State.SUCCESS, second.error
    assert second.checksum is None
    assert second.payload is not None and sender.source(2).mismatches(second.payload) == []


class WritesAtOnce(SenderLink):
    """A sender so quick that its first chunk, aux row included, has landed when ``init`` returns."""

    __slots__ = ()

    def init(self, blocks: Sequence[int], allocated_tokens: int) -> None:
        super().init(blocks, allocated_tokens)
        self._sender.deliver(self._room)


@pytest.mark.parametrize("stale", [False, True], ids=["fresh-pool", "stale-row"])
def test_the_checksum_is_cleared_before_the_init_so_a_sender_that_writes_at_once_keeps_its_own(stale: bool) -> None:
    pool = TorchBlockBuffers(2, B, 8)
    if stale:
        pool.aux[:, CHECKSUM_ALGORITHM], pool.aux[:, CHECKSUM], pool.aux[:, CHECKSUM_HIGH] = 2, 12345, 678
    sender = InProcessSender(pool, bank_rows=64)
    queue: ReceiverQueue[EmbeddingPayload] = ReceiverQueue(
        pool, OwningBlockAllocator(2, B), ReceiverConfig(default_alloc_tokens=D)
    )
    sender.add_room(1, D, checksum=True)
    request = queue.add(1, WritesAtOnce(sender, 1))
    queue.step()  # A0 granted, checksum cleared, init sent: the chunk lands at once
    queue.step()

    assert request.state is State.SUCCESS, request.error
    assert request.checksum == sender.source(1).checksum != 12345


def test_only_the_slots_past_t_and_the_delta_are_cleared() -> None:
    pool = TorchBlockBuffers(3, B, 8)
    pool.write_aux(1, total_tokens=77, mrope_delta=-8, checksum=0xFEEDFACE)
    pool.aux[1, 4:] = 9
    pool.write_aux(2, total_tokens=5, mrope_delta=6, checksum=0xBEEF)

    pool.clear_checksum(1)

    assert pool.aux[1].tolist() == [77, -8] + [0] * 14
    assert pool.read_aux(1).checksum is None
    assert pool.read_aux(2).checksum == 0xBEEF  # another row is left alone
