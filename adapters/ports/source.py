"""What the in-process sender writes: a seeded source per room, produced straight into the receiver's rows.

A token's embedding is its id's row in a bank shared by every room, so a source is only ids, positions
and a delta, and a payload can be checked bit for bit against it (I6) without keeping a second copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epd_receiver.adapters.ports.buffers import BlockView
from epd_receiver.adapters.ports.digest import Digest
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.fsm import ChecksumAlgorithm


class EmbeddingBank:
    """Seeded embedding rows: a token's embedding is its id's row, so a source is just ids and positions."""

    def __init__(self, hidden_size: int, deepstack_layers: int, *, rows: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.rows = rows
        self.embeddings = torch.randn(rows, hidden_size, generator=generator).to(torch.bfloat16)
        self.deepstack = (
            torch.randn(rows, hidden_size * deepstack_layers, generator=generator).to(torch.bfloat16)
            if deepstack_layers
            else None
        )


@dataclass(slots=True)
class SourcePayload:
    """What the sender produced for one room; every token's data derives from these tensors."""

    bank: EmbeddingBank
    fill_ids: torch.Tensor
    mrope_positions: torch.Tensor
    mrope_delta: int
    checksum: int | None = None
    checksum_algorithm: ChecksumAlgorithm = ChecksumAlgorithm.XXH3_64

    @property
    def total_tokens(self) -> int:
        return int(self.fill_ids.shape[0])

    def digest(self, algorithm: ChecksumAlgorithm, chunk: int = 4096) -> int:
        """The digest the receiver will compute over the payload, streamed without materialising it."""
        rows = [(start, min(start + chunk, self.total_tokens)) for start in range(0, self.total_tokens, chunk)]
        value = Digest(algorithm).update(self.bank.embeddings[self._rows(a, b)] for a, b in rows)
        value.update([self.fill_ids, self.mrope_positions])
        if self.bank.deepstack is not None:
            value.update(self.bank.deepstack[self._rows(a, b)] for a, b in rows)
        return value.value()

    def write_tokens(self, start: int, stop: int, view: BlockView) -> None:
        """Produce tokens [start, stop) straight into a pool row, as an encoder writing its output would."""
        rows = self._rows(start, stop)
        torch.index_select(self.bank.embeddings, 0, rows, out=view.embeddings)
        view.fill_ids.copy_(self.fill_ids[start:stop])
        view.mrope_positions.copy_(self.mrope_positions[:, start:stop])
        if view.deepstack is not None:
            if self.bank.deepstack is None:
                view.deepstack.zero_()
            else:
                torch.index_select(self.bank.deepstack, 0, rows, out=view.deepstack)

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        return self.fill_ids[start:stop].long() % self.bank.rows

    def mismatches(self, payload: EmbeddingPayload, chunk: int = 1024) -> list[str]:
        """Names of the parts of ``payload`` that are not bit-identical to this source (I6)."""
        if payload.total_tokens != self.total_tokens:
            return [f"total_tokens {payload.total_tokens} != {self.total_tokens}"]
        wrong = []
        if payload.mrope_delta != self.mrope_delta:
            wrong.append(f"mrope_delta {payload.mrope_delta} != {self.mrope_delta}")
        if not torch.equal(payload.fill_ids, self.fill_ids):
            wrong.append("fill_ids")
        if not torch.equal(payload.mrope_positions, self.mrope_positions):
            wrong.append("mrope_positions")
        if (self.bank.deepstack is None) != (payload.deepstack is None):
            wrong.append("deepstack presence")
        parts = [("embeddings", self.bank.embeddings, payload.embeddings)]
        if self.bank.deepstack is not None and payload.deepstack is not None:
            parts.append(("deepstack", self.bank.deepstack, payload.deepstack))
        for name, bank, got in parts:
            expected = torch.empty(min(chunk, self.total_tokens), bank.shape[1], dtype=bank.dtype)
            for start in range(0, self.total_tokens, chunk):
                stop = min(start + chunk, self.total_tokens)
                torch.index_select(bank, 0, self._rows(start, stop), out=expected[: stop - start])
                if not torch.equal(got[start:stop], expected[: stop - start]):
                    wrong.append(f"{name}[{start}:{stop}]")
                    break
        return wrong
