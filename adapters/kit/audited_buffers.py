"""The pool port as the controller sees it inside a World: every read passes the judge first.

The judge decides I1 and I2 from the reads that reach the pool, never from what the controller says it
read, so the witness sits on the port itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.fsm import AuxRow, ChecksumAlgorithm

if TYPE_CHECKING:
    from epd_receiver.adapters.kit.judge import Judge


class Judged(Protocol):
    """Whatever holds the judge: it is made after the queue that holds these buffers."""

    judge: Judge


class AuditedBuffers:
    """The BlockBuffers port with a witness: every read is checked against the sender and the allocator."""

    def __init__(self, world: Judged, inner: TorchBlockBuffers) -> None:
        self._world = world
        self.inner = inner

    @property
    def block_size(self) -> int:
        return self.inner.block_size

    def read_aux(self, block: int) -> AuxRow:
        self._world.judge.aux_read(block)
        return self.inner.read_aux(block)

    def clear_checksum(self, block: int) -> None:
        self.inner.clear_checksum(block)

    def new_payload(
        self, total_tokens: int, mrope_delta: int, digest: ChecksumAlgorithm | None = None
    ) -> EmbeddingPayload:
        return self.inner.new_payload(total_tokens, mrope_delta, digest)

    def checksum(self, payload: EmbeddingPayload, algorithm: ChecksumAlgorithm) -> int:
        return self.inner.checksum(payload, algorithm)

    def gather(self, blocks: Sequence[int], tokens: int, into: EmbeddingPayload, at: int) -> None:
        self._world.judge.gathered(tuple(blocks))
        self.inner.gather(blocks, tokens, into, at)
