"""Digests of a payload's raw bytes: streamed over tensors in order, or while the payload is assembled.

A digest serves two checks at Success: the sender's checksum (integrity) and, with several ranks, the
comparison of what each rank assembled. Hashing an assembled payload afterwards reads it from memory a
second time; hashing each piece right after it is copied, while it is still in the cache, costs a
fraction of that. ``AssemblyDigest`` is that second way: the buffers feed it as they gather, in order.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np
import torch
import xxhash

from epd_receiver.fsm import ChecksumAlgorithm


def raw_bytes(part: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor, without a copy when it is contiguous (as every payload part is)."""
    return memoryview(part.contiguous().view(torch.uint8).numpy())


class Digest:
    """A checksum streamed over byte runs in order (chunks of one tensor may follow each other)."""

    def __init__(self, algorithm: ChecksumAlgorithm) -> None:
        self.algorithm = algorithm
        self._crc = 0
        self._xxh3 = xxhash.xxh3_64() if algorithm is ChecksumAlgorithm.XXH3_64 else None

    def update(self, parts: Iterable[torch.Tensor]) -> Digest:
        for part in parts:
            self.update_bytes(raw_bytes(part))
        return self

    def update_bytes(self, data: memoryview | np.ndarray) -> None:
        if self._xxh3 is not None:
            self._xxh3.update(data)
        else:
            self._crc = zlib.crc32(data, self._crc)

    def value(self) -> int:
        return self._crc if self._xxh3 is None else self._xxh3.intdigest()

    def __deepcopy__(self, memo: dict[int, object]) -> Digest:
        """A copy that goes on from the same state: xxhash's state copies, but does not pickle."""
        twin = Digest.__new__(Digest)
        twin.algorithm, twin._crc = self.algorithm, self._crc
        twin._xxh3 = None if self._xxh3 is None else self._xxh3.copy()
        return twin


def digest(parts: Iterable[torch.Tensor], algorithm: ChecksumAlgorithm) -> int:
    """``algorithm``'s digest of the raw bytes of ``parts`` in order, as one stream."""
    return Digest(algorithm).update(parts).value()


class AssemblyDigest:
    """The digest of a payload computed while its embedding rows are gathered, round after round.

    The payload's digest runs over all T embedding rows, then the ids, the positions and the deepstack
    features; the rows arrive in order (each round continues where the last stopped), so they can be
    hashed as they are copied. The rest is hashed once the last row has landed. A gather out of order,
    which the controller never makes, leaves the digest unknown (``value`` None): it is then computed
    from the assembled payload instead.
    """

    __slots__ = ("_digest", "broken", "rows", "value")

    def __init__(self, algorithm: ChecksumAlgorithm) -> None:
        self._digest = Digest(algorithm)
        self.rows = 0  # embedding rows hashed so far
        self.value: int | None = None
        self.broken = False

    @property
    def algorithm(self) -> ChecksumAlgorithm:
        return self._digest.algorithm

    def continues_at(self, row: int) -> bool:
        """Whether rows starting at ``row`` are the next the digest needs; if not, it gives up for good."""
        if row != self.rows or self.value is not None:
            self.broken = True
        return not self.broken

    def rows_copied(self, data: np.ndarray, rows: int) -> None:
        """Embedding rows just copied into the payload, as raw bytes, in order."""
        self._digest.update_bytes(data)
        self.rows += rows

    def finish(self, rest: Iterable[torch.Tensor]) -> None:
        """Every embedding row is in: hash what follows them in the digest, and keep the value."""
        if not self.broken:
            self.value = self._digest.update(rest).value()
