"""The assembled payload a successful request hands to the caller."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from epd_receiver.adapters.ports.digest import AssemblyDigest, digest
from epd_receiver.fsm import ChecksumAlgorithm


def token_bytes(hidden_size: int, deepstack_layers: int) -> int:
    """What one token of a payload occupies: its bf16 rows (the embedding and each deepstack layer), its
    int32 fill id and its three int32 M-RoPE positions."""
    return hidden_size * 2 * (1 + deepstack_layers) + 4 + 12


@dataclass(slots=True)
class EmbeddingPayload:
    """Everything the Language side needs to prefill one multimodal prompt of T tokens."""

    embeddings: torch.Tensor  # (T, H) bfloat16
    fill_ids: torch.Tensor  # (T,) int32, image placeholders expanded
    mrope_positions: torch.Tensor  # (3, T) int32
    deepstack: torch.Tensor | None  # (T, H*K) bfloat16 when the model has deepstack layers
    total_tokens: int
    mrope_delta: int
    # The digest the buffers compute while assembling, when the controller said at its start that one would
    # be asked for (a sender's checksum, or ranks comparing payloads); None otherwise.
    assembly_digest: AssemblyDigest | None = field(default=None, repr=False, compare=False)

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

    def digest_parts(self) -> list[torch.Tensor]:
        """What the integrity checksum covers, in order: embeddings, ids, positions (three runs of T), then
        deepstack."""
        parts = [self.embeddings, self.fill_ids, self.mrope_positions]
        return parts + ([self.deepstack] if self.deepstack is not None else [])

    def digest(self, algorithm: ChecksumAlgorithm = ChecksumAlgorithm.XXH3_64) -> int:
        """The integrity checksum of the payload as it is now."""
        return digest(self.digest_parts(), algorithm)

    def input_embeds(self) -> torch.Tensor:
        """What the model's forward takes: deepstack features joined on the last dimension."""
        if self.deepstack is None:
            return self.embeddings
        return torch.cat([self.embeddings, self.deepstack], dim=-1)


def _storage_users(tensor: torch.Tensor) -> int | None:
    """How many holders share ``tensor``'s storage (every tensor viewing it counts), or None when unknown.

    Torch keeps a use count on each storage; it has no public accessor, so this reads the private one and
    answers None if it is missing or refuses, which makes the arena stop reusing storage rather than guess.
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    try:
        return int(use_count(tensor.untyped_storage()._cdata))
    except (AttributeError, RuntimeError, TypeError):
        return None


def _calibrate_sole_holder() -> int | None:
    """The count a storage held by one tensor alone reports, checked to rise with a view and fall back.

    None (never reuse) when the count does not behave that way on this build of torch.
    """
    probe = torch.empty(1)
    alone = _storage_users(probe)
    if alone is None:
        return None
    view = probe[:]
    viewed = _storage_users(probe)
    del view
    if viewed != alone + 1 or _storage_users(probe) != alone:
        return None
    return alone


_SOLE_HOLDER = _calibrate_sole_holder()


def storage_unshared(tensor: torch.Tensor) -> bool:
    """True when no tensor but ``tensor`` itself views its storage; False when that cannot be told."""
    users = _storage_users(tensor)
    return _SOLE_HOLDER is not None and users is not None and users <= _SOLE_HOLDER


@dataclass(slots=True)
class _Slab:
    """Flat output storage for up to ``capacity`` tokens; a payload is a set of views of its head."""

    capacity: int
    embeddings: torch.Tensor  # (capacity * H,) bfloat16
    fill_ids: torch.Tensor  # (capacity,) int32
    mrope_positions: torch.Tensor  # (3 * capacity,) int32
    deepstack: torch.Tensor | None  # (capacity * H * K,) bfloat16

    def parts(self) -> list[torch.Tensor]:
        parts = [self.embeddings, self.fill_ids, self.mrope_positions]
        return parts + ([self.deepstack] if self.deepstack is not None else [])

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts())

    def unviewed(self) -> bool:
        """No payload view, nor any tensor derived by viewing one, still points into this storage."""
        return all(storage_unshared(part) for part in self.parts())

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
    has finished with avoids that, so assembly runs at memory-copy speed.

    Giving a payload back does not make its storage reusable by itself: a caller may still hold a tensor
    viewing it (SGLang's ``Req`` keeps ``input_embeds`` after its prefill). Storage given back is reused
    only once torch reports that no tensor views it any more; until then it waits here, and a build of
    torch that cannot say means it is never reused (fresh memory instead). Storage given back beyond
    ``max_idle_bytes`` is dropped (largest first): the arena forgets it, and torch frees it with its last
    view.
    """

    def __init__(self, hidden_size: int, deepstack_layers: int = 0, *, max_idle_bytes: int = 1 << 30) -> None:
        if hidden_size <= 0 or deepstack_layers < 0 or max_idle_bytes < 0:
            raise ValueError("hidden_size must be positive, deepstack_layers and max_idle_bytes not negative")
        self.hidden_size = hidden_size
        self.deepstack_layers = deepstack_layers
        self.max_idle_bytes = max_idle_bytes
        self._idle: list[_Slab] = []  # given back (reusable once unviewed), sorted by capacity, smallest first
        self._lent: dict[int, tuple[EmbeddingPayload, _Slab]] = {}
        self.reused = 0
        self.allocated = 0

    def take(self, total_tokens: int, mrope_delta: int = 0) -> EmbeddingPayload:
        """The smallest unviewed idle storage that holds ``total_tokens``, else new storage (cold: it will fault)."""
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
        """Return a payload's storage; False (and nothing happens) for one this arena did not lend.

        The storage is reused only after every tensor viewing it is gone, the caller's included.
        """
        lent = self._lent.pop(id(payload), None)
        if lent is None or lent[0] is not payload:
            return False
        self._keep(lent[1])
        return True

    def reserve(self, total_tokens: int, count: int = 1) -> None:
        """Pre-fault storage for ``count`` payloads of ``total_tokens`` at start-up, off the serving path."""
        for _ in range(count):
            slab = self._new_slab(total_tokens)
            for part in slab.parts():
                part.zero_()
            self._keep(slab)

    @property
    def idle_bytes(self) -> int:
        """Bytes given back and kept, reusable now or once their last view is gone."""
        return sum(slab.nbytes for slab in self._idle)

    @property
    def lent(self) -> int:
        return len(self._lent)

    @property
    def still_viewed(self) -> int:
        """Storage given back that some tensor still views, so that no payload may be assembled into it."""
        return sum(not slab.unviewed() for slab in self._idle)

    def _best_fit(self, total_tokens: int) -> _Slab | None:
        for i, slab in enumerate(self._idle):
            if slab.capacity >= total_tokens and slab.unviewed():
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
