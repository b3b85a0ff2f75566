"""The deviations the catalogued variants apply to the real controller: replaced actions and guards, and
one replaced allocation pass. Each class changes one thing; ``variants.py`` names them and says which
invariant must catch each. Nothing in the product refers to them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from epd_receiver.adapters.ports.digest import digest
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.fsm import ChecksumAlgorithm, IntegrityError, KVPoll, ReceiverQueue, ReceiverRequest

# ---- replaced actions --------------------------------------------------------------------------------


class InitWithRequestedTokens(ReceiverRequest[EmbeddingPayload]):
    """#2: the init carries the tokens asked for, not ``len(blocks)*B`` granted."""

    def send_init(self, event: Any) -> None:
        self.first_block = self.blocks[0] if self.blocks else None
        self.link.init(self.blocks, self._wiring.config.default_alloc_tokens)


class TotalFromCurrentBlocks(ReceiverRequest[EmbeddingPayload]):
    """#3, #7: T taken from the aux row of the *current* allocation's first block, through the window."""

    def learn_total_from_current(self, event: Any) -> None:
        self.total_tokens = self._window.read_aux(self.blocks[0]).total_tokens


class DedupeByBlocks(ReceiverRequest[EmbeddingPayload]):
    """#6: every Transferring re-frees and re-allocates; the resume is skipped only if the blocks repeat."""

    def rehandle_unless_same_blocks(self, event: Any) -> None:
        allocator = self._wiring.allocator
        last = self.blocks
        allocator.free(self.room, last)
        blocks = allocator.alloc(self.room, self.tokens_wanted)
        self.blocks = blocks or ()
        if blocks and blocks != last:
            self.link.resume(blocks, self.landed, self.capacity)


class FreeKeepsRecord(ReceiverRequest[EmbeddingPayload]):
    """#14: A0 goes back to the pool but the request still names it, so a failure frees it again."""

    def free_but_keep_record(self, event: Any) -> None:
        self._wiring.allocator.free(self.room, self.blocks)


class TryRemainderOnce(ReceiverRequest[EmbeddingPayload]):
    """#15: free A0, try to allocate the remainder once; on failure carry on and never try again."""

    def alloc_remainder_once(self, event: Any) -> None:
        blocks = self._wiring.allocator.alloc(self.room, self.tokens_wanted)
        if blocks is not None:
            self.blocks = blocks
            self.send_resume(event)


class AuxView(ReceiverRequest[EmbeddingPayload]):
    """#17: the cached total is a live view of the aux row of A0[0], read again on every use."""

    _aux_block: int | None = None

    @property  # type: ignore[override]
    def total_tokens(self) -> int | None:
        if self._aux_block is None:
            return None
        return self._wiring.buffers.read_aux(self._aux_block).total_tokens

    @total_tokens.setter
    def total_tokens(self, value: int | None) -> None:
        self._aux_block = None if value is None else self.first_block


class DeltaDropped(ReceiverRequest[EmbeddingPayload]):
    """#18: the payload is built without the M-RoPE delta (the original then treated it as text-only)."""

    def check_total(self, event: Any) -> None:
        super().check_total(event)
        assert self.payload is not None
        self.payload.mrope_delta = 0


class WarmupTreatedAsReal(ReceiverRequest[EmbeddingPayload]):
    """#20: a warm-up (fake) request is not told apart, so it takes real blocks and gets a real init."""

    def is_warmup(self, event: Any = None) -> bool:
        return False


class StaleAuxTrusted(ReceiverRequest[EmbeddingPayload]):
    """#22: a resume block's aux row is assumed zero when unwritten; a non-zero value is taken as T."""

    def trust_nonzero_aux_of_current(self, event: Any) -> None:
        total = self._wiring.buffers.read_aux(self.blocks[0]).total_tokens
        if total:
            self.total_tokens = total


class OwnFailedAsEvidence(ReceiverRequest[EmbeddingPayload]):
    """#23 through the link: a Failed or Success that ``poll()`` returns is taken as proof that the sender
    stopped writing, although SGLang's receiver returns Failed after our own abort, the sender unaware."""

    _seen: int | None = None

    def local_poll(self) -> int:
        self._seen = super().local_poll()
        return self._seen

    def local_writes_stopped(self) -> bool:
        return self._seen in (KVPoll.Failed, KVPoll.Success) or super().local_writes_stopped()


class ChecksumOverEmbeddingsOnly(ReceiverRequest[EmbeddingPayload]):
    """A checksum over the wrong part of the payload: every good checksummed request fails IntegrityError."""

    def verify_checksum(self, event: Any) -> None:
        if self.checksum is None:
            return
        assert self.payload is not None
        if digest([self.payload.embeddings], ChecksumAlgorithm(self.checksum_algorithm)) != self.checksum:
            raise IntegrityError(self.room, "the embeddings do not match the sender's checksum")


class DeadlineFromArrival(ReceiverRequest[EmbeddingPayload]):
    """Every state's deadline counted from the request's arrival instead of the state's entry."""

    def stamp_entry(self, event: Any) -> None:
        arrived = getattr(self, "_arrived", None)
        if arrived is None:
            arrived = self._arrived = self._wiring.clock.now()
        limit = self._wiring.deadlines.get(self.state)
        self.deadline_at = math.inf if limit is None else arrived + limit


class AdmissionsFirst(ReceiverQueue[EmbeddingPayload]):
    """The allocation pass serves new admissions before the remainders of requests already started."""

    def _waiting(self) -> Iterator[ReceiverRequest[EmbeddingPayload]]:
        for state in reversed(self.spec.allocation_order):
            yield from [r for r in self._live.values() if r.state is state]
