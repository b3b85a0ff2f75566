"""The assembled payload a successful request hands to the caller."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch


def crc32(parts: Iterable[torch.Tensor], value: int = 0) -> int:
    """CRC32 over the raw bytes of ``parts`` in order, as one stream (chunks of one tensor may follow)."""
    for part in parts:
        value = zlib.crc32(part.contiguous().view(torch.uint8).numpy(), value)
    return value


@dataclass(slots=True)
class EmbeddingPayload:
    """Everything the Language side needs to prefill one multimodal prompt of T tokens."""

    embeddings: torch.Tensor  # (T, H) bfloat16
    fill_ids: torch.Tensor  # (T,) int32, image placeholders expanded
    mrope_positions: torch.Tensor  # (3, T) int32
    deepstack: torch.Tensor | None  # (T, H*K) bfloat16 when the model has deepstack layers
    total_tokens: int
    mrope_delta: int

    @classmethod
    def empty(
        cls, total_tokens: int, hidden_size: int, deepstack_layers: int, mrope_delta: int = 0
    ) -> EmbeddingPayload:
        return cls(
            embeddings=torch.empty(total_tokens, hidden_size, dtype=torch.bfloat16),
            fill_ids=torch.empty(total_tokens, dtype=torch.int32),
            mrope_positions=torch.empty(3, total_tokens, dtype=torch.int32),
            deepstack=(
                torch.empty(total_tokens, hidden_size * deepstack_layers, dtype=torch.bfloat16)
                if deepstack_layers
                else None
            ),
            total_tokens=total_tokens,
            mrope_delta=mrope_delta,
        )

    def crc32(self) -> int:
        """The integrity checksum: embeddings, ids, positions (three runs of T), then deepstack."""
        parts = [self.embeddings, self.fill_ids, self.mrope_positions]
        return crc32(parts + ([self.deepstack] if self.deepstack is not None else []))

    def input_embeds(self) -> torch.Tensor:
        """What the model's forward takes: deepstack features joined on the last dimension."""
        if self.deepstack is None:
            return self.embeddings
        return torch.cat([self.embeddings, self.deepstack], dim=-1)


@dataclass(slots=True)
class _Slab:
    """Flat output storage for up to ``capacity`` tokens; a payload is a set of views of its head."""

    capacity: int
    embeddings: torch.Tensor  # (capacity * H,) bfloat16
    fill_ids: torch.Tensor  # (capacity,) int32
    mrope_positions: torch.Tensor  # (3 * capacity,) int32
    deepstack: torch.Tensor | None  # (capacity * H * K,) bfloat16

    @property
    def nbytes(self) -> int:
        parts = [self.embeddings, self.fill_ids, self.mrope_positions]
        return sum(t.nbytes for t in parts + ([self.deepstack] if self.deepstack is not None else []))

    def view(self, total_tokens: int, hidden_size: int, mrope_delta: int) -> EmbeddingPayload:
        """Contiguous views of the first ``total_tokens`` tokens, shaped as a freshly allocated payload."""
        t = total_tokens
        deepstack = None
        if self.deepstack is not None:
            width = self.deepstack.numel() // self.capacity
            deepstack = self.deepstack[: t * width].view(t, width)
        return EmbeddingPayload(
            embeddings=self.embeddings[: t * hidden_size].view(t, hidden_size),
            fill_ids=self.fill_ids[:t],
            mrope_positions=self.mrope_positions[: 3 * t].view(3, t),
            deepstack=deepstack,
            total_tokens=t,
            mrope_delta=mrope_delta,
        )


class PayloadArena:
    """Output memory that stays warm: a payload's storage returns here when the caller is done with it.

    Writing into freshly allocated memory costs a page fault per 4 KiB page, which makes assembling a
    large payload several times slower than the copy itself. Reusing the storage of a payload the caller
    has finished with avoids that, so assembly runs at memory-copy speed. A payload stays valid until it
    is given back; idle storage beyond ``max_idle_bytes`` is dropped (largest first) rather than kept.
    """

    def __init__(self, hidden_size: int, deepstack_layers: int = 0, *, max_idle_bytes: int = 1 << 30) -> None:
        if hidden_size <= 0 or deepstack_layers < 0 or max_idle_bytes < 0:
            raise ValueError("hidden_size must be positive, deepstack_layers and max_idle_bytes not negative")
        self.hidden_size = hidden_size
        self.deepstack_layers = deepstack_layers
        self.max_idle_bytes = max_idle_bytes
        self._idle: list[_Slab] = []  # sorted by capacity, smallest first
        self._lent: dict[int, tuple[EmbeddingPayload, _Slab]] = {}
        self.reused = 0
        self.allocated = 0

    def take(self, total_tokens: int, mrope_delta: int = 0) -> EmbeddingPayload:
        """The smallest idle storage that holds ``total_tokens``, else new storage (cold: it will fault)."""
        if total_tokens <= 0:
            raise ValueError(f"a payload holds at least one token, not {total_tokens}")
        slab = self._best_fit(total_tokens)
        if slab is None:
            slab = self._new_slab(total_tokens)
            self.allocated += 1
        else:
            self.reused += 1
        payload = slab.view(total_tokens, self.hidden_size, mrope_delta)
        self._lent[id(payload)] = (payload, slab)
        return payload

    def give_back(self, payload: EmbeddingPayload) -> bool:
        """Return a payload's storage; False (and nothing happens) for one this arena did not lend."""
        lent = self._lent.pop(id(payload), None)
        if lent is None or lent[0] is not payload:
            return False
        self._keep(lent[1])
        return True

    def reserve(self, total_tokens: int, count: int = 1) -> None:
        """Pre-fault storage for ``count`` payloads of ``total_tokens`` at start-up, off the serving path."""
        for _ in range(count):
            slab = self._new_slab(total_tokens)
            for part in (slab.embeddings, slab.fill_ids, slab.mrope_positions, slab.deepstack):
                if part is not None:
                    part.zero_()
            self._keep(slab)

    @property
    def idle_bytes(self) -> int:
        return sum(slab.nbytes for slab in self._idle)

    @property
    def lent(self) -> int:
        return len(self._lent)

    def _best_fit(self, total_tokens: int) -> _Slab | None:
        for i, slab in enumerate(self._idle):
            if slab.capacity >= total_tokens:
                return self._idle.pop(i)
        return None

    def _new_slab(self, capacity: int) -> _Slab:
        h, k = self.hidden_size, self.deepstack_layers
        return _Slab(
            capacity=capacity,
            embeddings=torch.empty(capacity * h, dtype=torch.bfloat16),
            fill_ids=torch.empty(capacity, dtype=torch.int32),
            mrope_positions=torch.empty(3 * capacity, dtype=torch.int32),
            deepstack=torch.empty(capacity * h * k, dtype=torch.bfloat16) if k else None,
        )

    def _keep(self, slab: _Slab) -> None:
        self._idle.append(slab)
        self._idle.sort(key=lambda s: s.capacity)
        while self._idle and self.idle_bytes > self.max_idle_bytes:
            self._idle.pop()  # the largest goes first: it is the one that costs most to keep
