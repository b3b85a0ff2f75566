"""The receive pool with SGLang's ``MultimodalDataBuffers`` layout, both ends of it.

One row is one block of B tokens. Per-token buffers hold a block's n tokens at the start of the row;
M-RoPE packs the three position runs of those n tokens back to back (``[p0, p1, p2]``, 3n values), so a
partial last block is *not* laid out at offsets 0, B, 2B. The aux row carries T and the M-RoPE delta,
and, from our senders, a digest of the payload (xxh3-64 or CRC32); only the first block of the receiver's
first allocation ever has a meaningful one. Token rows are never cleared: stale aux rows of earlier requests are a real
hazard here, as in the original, so the receiver clears A0[0]'s checksum slots before its init names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from epd_receiver.adapters.ports.digest import AssemblyDigest
from epd_receiver.adapters.ports.payload import EmbeddingPayload, PayloadArena
from epd_receiver.fsm import AuxRow, ChecksumAlgorithm

AUX_INTS = 16  # [0] = T, [1] = M-RoPE delta, [2..4] checksum, [5..15] unused: RDMA moves at least 64 bytes
# [2] = the algorithm's id (ChecksumAlgorithm) when [3] and [4] hold the low and high 32 bits of the payload's
# digest, 0 when no checksum follows (SGLang's sender writes none of them)
CHECKSUM_ALGORITHM, CHECKSUM, CHECKSUM_HIGH = 2, 3, 4
# A piece copied and then hashed at once: small enough that source and copy both stay in a core's L2 cache
# (1 MiB here; a 128-token row of H=3584 is 896 KiB). On an idle machine, the Success step over memcpy
# measured 1.33-1.36 with 128-256 KiB pieces and 1.16-1.27 with 448 KiB-1 MiB.
_HASHED_PIECE_BYTES = 512 * 1024


@dataclass(frozen=True, slots=True)
class BlockView:
    """The first n token slots of one pool row, per buffer, shaped per token."""

    embeddings: torch.Tensor  # (n, H)
    fill_ids: torch.Tensor  # (n,)
    mrope_positions: torch.Tensor  # (3, n), three consecutive runs of n in the row
    deepstack: torch.Tensor | None  # (n, H*K)


class TorchBlockBuffers:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        hidden_size: int,
        deepstack_layers: int = 0,
        *,
        pin_memory: bool = False,
        arena: PayloadArena | None = None,
    ) -> None:
        if min(num_blocks, block_size, hidden_size) <= 0 or deepstack_layers < 0:
            raise ValueError("num_blocks, block_size and hidden_size must be positive")
        self.num_blocks = num_blocks
        self._block_size = block_size
        self.hidden_size = hidden_size
        self.deepstack_layers = deepstack_layers
        if arena is not None and (arena.hidden_size, arena.deepstack_layers) != (hidden_size, deepstack_layers):
            raise ValueError("the payload arena's hidden size and deepstack layers must match the pool's")
        self.arena = arena
        n, b, h = num_blocks, block_size, hidden_size

        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, pin_memory=pin_memory)

        self.embeddings = zeros(n, b * h, dtype=torch.bfloat16)
        self.fill_ids = zeros(n, b, dtype=torch.int32)
        self.mrope_positions = zeros(n, 3 * b, dtype=torch.int32)
        self.aux = zeros(n, AUX_INTS, dtype=torch.int32)
        self.deepstack = zeros(n, b * h * deepstack_layers, dtype=torch.bfloat16) if deepstack_layers else None

    @property
    def block_size(self) -> int:
        return self._block_size

    def buffers(self) -> list[torch.Tensor]:
        """The pool tensors in the original order: embeddings, ids, M-RoPE, aux, then deepstack if any."""
        tensors = [self.embeddings, self.fill_ids, self.mrope_positions, self.aux]
        return tensors + ([self.deepstack] if self.deepstack is not None else [])

    def get_buf_infos(self) -> tuple[list[int], list[int], list[int]]:
        """Pointers, total byte lengths and per-row byte lengths, as a sender written for SGLang expects."""
        tensors = self.buffers()
        return (
            [t.data_ptr() for t in tensors],
            [t.nbytes for t in tensors],
            [t[0].nbytes for t in tensors],
        )

    # ---- the receiver's side (the BlockBuffers port) ---------------------------------------------

    def read_aux(self, block: int) -> AuxRow:
        row = self.aux[block].tolist()
        if row[CHECKSUM_ALGORITHM] == 0:
            return AuxRow(total_tokens=row[0], mrope_delta=row[1])
        checksum = (row[CHECKSUM] & 0xFFFFFFFF) | (row[CHECKSUM_HIGH] & 0xFFFFFFFF) << 32
        return AuxRow(row[0], row[1], checksum=checksum, checksum_algorithm=row[CHECKSUM_ALGORITHM])

    def clear_checksum(self, block: int) -> None:
        """Zero every slot past T and the delta (the checksum and the unused rest), which a sender that
        writes no checksum leaves as it found them; T and the delta are the sender's to write."""
        self.aux[block, CHECKSUM_ALGORITHM:].zero_()

    def checksum(self, payload: EmbeddingPayload, algorithm: ChecksumAlgorithm) -> int:
        """The digest computed while assembling, when it was asked for with this algorithm; else one pass now."""
        streamed = payload.assembly_digest
        if streamed is not None and streamed.algorithm is algorithm and streamed.value is not None:
            return streamed.value
        return payload.digest(algorithm)

    def new_payload(
        self, total_tokens: int, mrope_delta: int, digest: ChecksumAlgorithm | None = None
    ) -> EmbeddingPayload:
        """From the arena when there is one (warm memory, valid until recycled), else freshly allocated;
        with ``digest``, the gathers into it also hash it."""
        if self.arena is not None:
            payload = self.arena.take(total_tokens, mrope_delta)
        else:
            payload = EmbeddingPayload.empty(total_tokens, self.hidden_size, self.deepstack_layers, mrope_delta)
        payload.assembly_digest = None if digest is None else AssemblyDigest(digest)
        return payload

    def recycle(self, payload: EmbeddingPayload) -> None:
        """The caller is done with ``payload``: its storage may back the next one (no-op without an arena)."""
        if self.arena is not None:
            self.arena.give_back(payload)

    def gather(self, blocks: Sequence[int], tokens: int, into: EmbeddingPayload, at: int) -> None:
        """Copy straight into the caller's output: whole blocks in one indexed copy each, then the tail.

        A payload whose digest is wanted has its embedding rows copied piece by piece instead, each piece
        hashed while it is still in the cache (``_copy_hashed``), which costs far less than a second pass.
        """
        b, h = self._block_size, self.hidden_size
        full, tail = divmod(tokens, b)
        if full > len(blocks) or (tail and full >= len(blocks)):
            raise ValueError(f"{tokens} tokens do not fit in {len(blocks)} blocks of {b}")
        streamed = into.assembly_digest
        hashed = streamed is not None and streamed.continues_at(at)
        if hashed:
            assert streamed is not None
            self._copy_hashed(blocks, tokens, into, at, streamed)
        if full:
            index = torch.tensor(blocks[:full], dtype=torch.int64)
            span = slice(at, at + full * b)
            if not hashed:
                torch.index_select(self.embeddings, 0, index, out=into.embeddings[span].view(full, b * h))
            torch.index_select(self.fill_ids, 0, index, out=into.fill_ids[span].view(full, b))
            rows = self.mrope_positions.index_select(0, index).view(full, 3, b)
            into.mrope_positions[:, span].view(3, full, b).copy_(rows.transpose(0, 1))
            if self.deepstack is not None and into.deepstack is not None:
                k = self.deepstack.shape[1]
                torch.index_select(self.deepstack, 0, index, out=into.deepstack[span].view(full, k))
        if tail:
            self._read_partial(blocks[full], tail, into, at + full * b, embeddings=not hashed)
        if hashed and at + tokens == into.total_tokens:
            assert streamed is not None
            streamed.finish(into.digest_parts()[1:])

    def _copy_hashed(
        self, blocks: Sequence[int], tokens: int, into: EmbeddingPayload, at: int, streamed: AssemblyDigest
    ) -> None:
        """Copy ``tokens`` embedding rows in pieces that fit the cache, hashing each piece just copied."""
        row_bytes = self.hidden_size * 2
        source = self.embeddings.view(torch.uint8).numpy()  # a view, taken anew: a copy of the pool has its own
        target = into.embeddings.view(-1).view(torch.uint8).numpy()
        step = max(1, _HASHED_PIECE_BYTES // row_bytes) * row_bytes
        offset = at * row_bytes
        for i, block in enumerate(blocks):
            n = min(self._block_size, tokens - i * self._block_size)
            if n <= 0:
                break
            row = source[block]
            for start in range(0, n * row_bytes, step):
                end = min(start + step, n * row_bytes)
                piece = target[offset + start : offset + end]
                np.copyto(piece, row[start:end])
                streamed.rows_copied(piece, (end - start) // row_bytes)
            offset += n * row_bytes

    def _read_partial(self, block: int, n: int, into: EmbeddingPayload, at: int, *, embeddings: bool = True) -> None:
        h = self.hidden_size
        span = slice(at, at + n)
        if embeddings:
            into.embeddings[span].copy_(self.embeddings[block, : n * h].view(n, h))
        into.fill_ids[span].copy_(self.fill_ids[block, :n])
        into.mrope_positions[:, span].copy_(self.mrope_positions[block, : 3 * n].view(3, n))
        if self.deepstack is not None and into.deepstack is not None:
            into.deepstack[span].copy_(self.deepstack[block, : n * h * self.deepstack_layers].view(n, -1))

    # ---- the sender's side (what an RDMA write of one chunk does to the rows) ---------------------

    def block_views(self, block: int, n: int) -> BlockView:
        """Views of the first n token slots of one row, for a writer that fills them in place."""
        h = self.hidden_size
        if not 0 < n <= self._block_size:
            raise ValueError(f"a block holds 1..{self._block_size} tokens, not {n}")
        return BlockView(
            embeddings=self.embeddings[block, : n * h].view(n, h),
            fill_ids=self.fill_ids[block, :n],
            mrope_positions=self.mrope_positions[block, : 3 * n].view(3, n),
            deepstack=(
                None if self.deepstack is None else self.deepstack[block, : n * h * self.deepstack_layers].view(n, -1)
            ),
        )

    def write_block(
        self,
        block: int,
        embeddings: torch.Tensor,
        fill_ids: torch.Tensor,
        mrope_positions: torch.Tensor,
        deepstack: torch.Tensor | None = None,
    ) -> None:
        """Write n <= B tokens at the start of one row; M-RoPE as three consecutive runs of n."""
        view = self.block_views(block, fill_ids.shape[0])
        view.embeddings.copy_(embeddings)
        view.fill_ids.copy_(fill_ids)
        view.mrope_positions.copy_(mrope_positions)
        if view.deepstack is not None:
            view.deepstack.copy_(deepstack) if deepstack is not None else view.deepstack.zero_()

    def write_aux(
        self,
        block: int,
        total_tokens: int,
        mrope_delta: int,
        checksum: int | None = None,
        algorithm: int = ChecksumAlgorithm.XXH3_64,
    ) -> None:
        """The sender's aux row; a checksum goes into slots 2-4 (its algorithm, then its low and high 32 bits
        as int32 bits), else they are cleared."""
        low, high = (0, 0) if checksum is None else (checksum & 0xFFFFFFFF, checksum >> 32 & 0xFFFFFFFF)
        self.aux[block, 0] = total_tokens
        self.aux[block, 1] = mrope_delta
        self.aux[block, CHECKSUM_ALGORITHM] = 0 if checksum is None else algorithm
        self.aux[block, CHECKSUM] = _int32_bits(low)
        self.aux[block, CHECKSUM_HIGH] = _int32_bits(high)


def _int32_bits(value: int) -> int:
    """An unsigned 32-bit value as the int32 that holds the same bits in an aux slot."""
    return value - (1 << 32) * (value >= 1 << 31)
