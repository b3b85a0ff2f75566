"""The actions that touch the pool's contents and build the payload: clear A0[0]'s checksum before the init,
learn T from it once the sender wrote it, judge it, copy what landed, and check what was assembled against
the ranks and the sender's checksum.

They are the request's only contact with the pool's contents, always through its read window, and each
raises a typed ReceiverError for input that cannot be true. ``ReceiverRequest`` drives them; it holds the
allocation they read (``blocks``) and the sender's reported progress.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic

from .config import Wiring
from .errors import CorruptAux, IntegrityError, RankDisagreement, Room, SizeMismatch
from .ports import ChecksumAlgorithm, PayloadT
from .window import ReadWindow


class PayloadAssembly(Generic[PayloadT]):
    # Kept by the request that drives these actions; declared for the type checker.
    room: Room
    blocks: tuple[int, ...]
    first_block: int | None
    reported_landed: int
    _wiring: Wiring[PayloadT]
    _window: ReadWindow[PayloadT]
    _landed_tokens: Callable[[], int] | None

    def _start_assembly(self) -> None:
        """Nothing known yet: T, the checksum and the delta arrive with A0[0]'s aux row."""
        self.total_tokens: int | None = None
        self.checksum: int | None = None
        self.checksum_algorithm: int = ChecksumAlgorithm.XXH3_64
        self._mrope_delta = 0
        self._digest: int | None = None  # the assembled payload's, once computed: one pass serves both checks
        self.landed = 0
        self.payload: PayloadT | None = None
        self.reads = 0

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self._wiring.allocator.block_size

    def clear_checksum(self, event: Any) -> None:
        """Clear A0[0]'s checksum while no sender has been told of the block: one an earlier request left
        there, which a sender that writes no checksum never overwrites, can then never be read as ours."""
        if self.blocks:
            self._wiring.buffers.clear_checksum(self.blocks[0])

    def learn_total(self, event: Any) -> None:
        """Read A0[0]'s aux row, by value, once; nothing is judged yet, so every rank reaches the agreement."""
        assert self.first_block is not None
        aux = self._window.read_aux(self.first_block)
        self.total_tokens, self.checksum, self._mrope_delta = aux.total_tokens, aux.checksum, aux.mrope_delta
        self.checksum_algorithm = aux.checksum_algorithm

    def check_total(self, event: Any) -> None:
        total = self._total()
        if not 0 < total <= self._wiring.config.max_total_tokens:
            self.total_tokens = None  # an impossible T is never kept, nor anything derived from it
            raise CorruptAux(
                self.room,
                f"aux[0] of block {self.first_block} is {total}, outside 1..{self._wiring.config.max_total_tokens}",
            )
        if self.checksum is not None and not ChecksumAlgorithm.known(self.checksum_algorithm):
            raise CorruptAux(
                self.room,
                f"aux[2] of block {self.first_block} names checksum algorithm {self.checksum_algorithm}, unknown",
            )
        self.payload = self._wiring.buffers.new_payload(total, self._mrope_delta, self._digest_algorithm())

    def agree_across_ranks(self, event: Any) -> None:
        """Every rank must have read the same T and checksum into an allocation of the same size (#4)."""
        checksum = [-1, 0, 0] if self.checksum is None else [self.checksum_algorithm, *digest_halves(self.checksum)]
        seen = [self._total(), self.capacity, *checksum]
        if not self._wiring.ranks.same(seen):
            self.total_tokens = None  # a T the ranks do not share is kept by none of them
            self._wiring.metrics.rank_disagreement("aux")
            raise RankDisagreement(self.room, f"the ranks differ on (T, S, checksum); this rank read {seen}")

    def agree_on_payload(self, event: Any) -> None:
        """With several ranks, every rank must hold bit-identical data; one digest each, compared."""
        ranks = self._wiring.ranks
        if ranks.size == 1 or not self._wiring.config.compare_payloads:
            return
        assert self.payload is not None
        if not ranks.same(digest_halves(self._payload_digest())):
            self._wiring.metrics.rank_disagreement("payload")
            raise RankDisagreement(self.room, "the ranks assembled different payloads")

    def expect_remainder(self, event: Any) -> None:
        if self._total() <= self.capacity:
            raise SizeMismatch(
                self.room, f"Transferring, but T={self._total()} fits in the {self.capacity} tokens allocated"
            )

    def expect_no_remainder(self, event: Any) -> None:
        if self._total() > self.capacity:
            raise SizeMismatch(
                self.room, f"Success, but T={self._total()} exceeds the {self.capacity} tokens allocated"
            )

    def expect_landed(self, event: Any) -> None:
        if self._landed_tokens is None:
            return
        reported = self.reported_landed
        holds = self.landed + min(self._total() - self.landed, self.capacity)
        if reported != holds:
            raise SizeMismatch(
                self.room,
                f"the sender reports {reported} tokens landed; after {self.landed} the allocation holds {holds}",
            )

    def gather_landed(self, event: Any) -> None:
        assert self.payload is not None
        tokens = min(self._total() - self.landed, self.capacity)
        self._window.gather(self.blocks, tokens, self.payload, self.landed)
        self.landed += tokens
        self.reads += 1

    def verify_checksum(self, event: Any) -> None:
        if self.checksum is None:
            return
        computed = self._payload_digest()
        if computed != self.checksum:
            name = ChecksumAlgorithm(self.checksum_algorithm).name
            raise IntegrityError(self.room, f"payload {name} {computed:#x}, the sender wrote {self.checksum:#x}")

    def _payload_digest(self) -> int:
        """The assembled payload's digest, computed once however many checks use it: only Success actions
        ask, after the last gather."""
        if self._digest is None:
            algorithm = self._digest_algorithm()
            assert algorithm is not None and self.payload is not None, "only a check that needs it asks"
            assert self.landed == self._total(), "only a whole payload is hashed"
            self._digest = self._wiring.buffers.checksum(self.payload, algorithm)
        return self._digest

    def _digest_algorithm(self) -> ChecksumAlgorithm | None:
        """The digest Success will need, known once the aux row is read: the sender's algorithm when it wrote
        a checksum, else the default when ranks compare their payloads; None when nothing will ask."""
        if self.checksum is not None:
            return ChecksumAlgorithm(self.checksum_algorithm)
        if self._wiring.ranks.size > 1 and self._wiring.config.compare_payloads:
            return ChecksumAlgorithm.XXH3_64
        return None

    def _total(self) -> int:
        assert self.total_tokens is not None, "T is read before any action that needs it"
        return self.total_tokens


def digest_halves(digest: int) -> list[int]:
    """A 64-bit digest as two 32-bit values: a rank group compares values well inside int64."""
    return [digest & 0xFFFFFFFF, digest >> 32]
