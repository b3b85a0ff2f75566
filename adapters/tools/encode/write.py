"""What the Encode side writes, and from where: staged source rows and the byte arithmetic of one chunk.

A chunk is produced into this process's own registered rows (the encoder's output buffers, reused from
one chunk to the next: the Encode loop writes one chunk at a time, synchronously) and moved with one
``batch_transfer_sync_write`` per Language rank. Sources derive from (seed, room, T) through
``InProcessSender``'s own generator, so a receiver verifies bit for bit by regenerating them, and
nothing but status crosses the wire.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.mooncake.link import Engine, Geometry, coalesce
from epd_receiver.adapters.ports.sender import InProcessSender
from epd_receiver.adapters.ports.source import SourcePayload
from epd_receiver.fsm import Room

AUX = 3  # the aux buffer's index in get_buf_infos order: embeddings, ids, M-RoPE, aux, deepstack


def write_entries(
    sources: Sequence[int],
    targets: Sequence[int],
    item_lens: Sequence[int],
    block_size: int,
    pairs: Sequence[tuple[int, int, int]],
    with_aux: bool,
) -> Iterator[tuple[int, int, int]]:
    """(src, dst, length) for every buffer of every (src row, dst row, tokens) pair, the fork's arithmetic.

    A per-token buffer moves ``item_len * n // B`` bytes of a row holding n tokens (M-RoPE's three packed
    runs included); the aux row moves whole, and only with the first pair of a first chunk
    (``conn_multimodal.py:306-359`` of ZhengWG/sglang at cca20b0). Buffer by buffer, so that rows
    following each other on both sides come out next to each other. Both pools have the same item
    lengths: the fork's wire does not carry them, each side is configured alike.
    """
    for j, item_len in enumerate(item_lens):
        for i, (src_row, dst_row, n) in enumerate(pairs):
            if j == AUX and not (with_aux and i == 0):
                continue
            length = item_len if j == AUX else item_len * n // block_size
            yield sources[j] + src_row * item_len, targets[j] + dst_row * item_len, length


class Staging:
    """Registered rows holding one chunk; the same chunk for the next Language rank is staged only once."""

    def __init__(self, engine: Engine, geometry: Geometry) -> None:
        self._engine = engine
        self.geometry = geometry
        self.rows = TorchBlockBuffers(
            geometry.num_blocks, geometry.block_size, geometry.hidden_size, geometry.deepstack
        )
        engine.register(self.rows.buffers())
        self.pointers, _, self.item_lens = self.rows.get_buf_infos()
        self._staged: tuple[SourcePayload, int, int] | None = None  # holding the source: its id is not reused

    def close(self) -> None:
        self._engine.unregister(self.rows.buffers())

    def stage(self, source: SourcePayload, start: int, tokens: int, *, with_aux: bool) -> None:
        """Produce tokens [start, start + tokens) into rows 0, 1, ...; the aux row 0 when asked."""
        b = self.geometry.block_size
        if self._staged is None or self._staged[0] is not source or self._staged[1:] != (start, tokens):
            for row, lo in enumerate(range(start, start + tokens, b)):
                n = min(b, start + tokens - lo)
                source.write_tokens(lo, lo + n, self.rows.block_views(row, n))
            self._staged = (source, start, tokens)
        if with_aux:
            self.rows.write_aux(0, source.total_tokens, source.mrope_delta, source.checksum, source.checksum_algorithm)

    def plan(
        self, targets: Sequence[int], pairs: Sequence[tuple[int, int, int]], with_aux: bool
    ) -> tuple[list[int], list[int], list[int]]:
        """The engine's (sources, targets, lengths) for staged rows into a Language rank's blocks."""
        entries = write_entries(self.pointers, targets, self.item_lens, self.geometry.block_size, pairs, with_aux)
        return coalesce(entries)


def source_generator(seed: int, geometry: Geometry) -> InProcessSender:
    """The in-process sender used only for its generator: (seed, room, T) -> the exact same source anywhere."""
    rows = TorchBlockBuffers(1, geometry.block_size, geometry.hidden_size, geometry.deepstack)
    return InProcessSender(rows, seed=seed)


def regenerate(generator: InProcessSender, room: Room, total_tokens: int, *, checksum: bool = False) -> SourcePayload:
    """Room ``room``'s source of ``total_tokens`` tokens, exactly as the sender of that seed produces it."""
    generator.add_room(room, total_tokens, checksum=checksum)
    source = generator.source(room)
    generator.forget(room)
    return source
