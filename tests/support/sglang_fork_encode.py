"""The SGLang fork's Encode side as the Language side meets it: ZhengWG/sglang, branch vl-dis-1030, commit cca20b0.

It registers with its bootstrap server, takes the Language side's registrations, inits and resumes, and
writes raw bytes by pointer into the rows the Language side registered, as the Mooncake sender does. The
Language side it talks to is in ``sglang_fork_receiver.py``.

Paths in the docstrings are under ``python/sglang/srt/``. The fake reproduces what the cited lines do, the
fork's faults included (it never hears of a Language-side abort); only sockets, threads and HTTP are gone:
a message between the two sides is a method call, made when the test says it arrives. It also keeps logs
the fork does not (``writes``, ``registrations``), for the tests to judge by, and never reads them to
decide anything.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.fsm import KVPoll
from support.sglang_fork_receiver import BootstrapServer, LanguageManager, Network

AUX_BUFFER = 3  # the aux rows are the fourth buffer of get_buf_infos() (disaggregation/utils.py:567-592)


# ---- disaggregation/mooncake/conn_multimodal.py: the Encode side, as the Language side meets it ------


@dataclass
class Source:
    """One request as the encoder produced it, in the Encode side's own blocks."""

    embeddings: torch.Tensor  # (T, H)
    fill_ids: torch.Tensor  # (T,)
    mrope: torch.Tensor  # (3, T)
    deepstack: torch.Tensor | None  # (T, H*K)
    delta: int
    blocks: list[int]

    @property
    def total(self) -> int:
        return int(self.fill_ids.shape[0])

    def input_embeds(self) -> torch.Tensor:
        if self.deepstack is None:
            return self.embeddings
        return torch.cat([self.embeddings, self.deepstack], dim=-1)


@dataclass
class TransferInfo:
    """``TransferEmbeddingInfo`` (disaggregation/mooncake/conn_multimodal.py:60-130): one destination."""

    manager: LanguageManager
    session: str
    dst_blocks: list[int]
    allocated_tokens: int
    sent_tokens: int = 0
    pending: bool = True  # a chunk is queued for the transfer worker


TRANSFER_QUEUES = 4  # SGLANG_DISAGGREGATION_QUEUE_SIZE's default (disaggregation/mooncake/conn_multimodal.py:176)


class EncodeSide:
    """The fork's Encode side seen from the Language side (disaggregation/mooncake/conn_multimodal.py).

    It registers with the bootstrap server at its address (:165, :784-808). Its embedding thread takes a
    Language side's registration (frame 0 ``"None"``), which clears any failure of that session
    (:509-521), an init (7 fields) or a resume (8 fields) (:522-625), and a chunk goes on the transfer
    queue the session's port picks (:745-758, :566-580). ``transfer`` is that queue's worker (:381-499):

    * a session that failed before fails every chunk at once: the Encode side records "Language instance
      could be dead ..." and sends Failed, writing nothing (:396-410);
    * ``send_embedding`` (:237-367) first checks the allocation against this side's own block size
      (:423, :265-274) and the blocks against the tokens (:296-303); either raises inside the worker,
      which re-raises (:496-499): the worker is gone, no status is sent, and its queue is never served
      again;
    * otherwise it writes, from this side's own rows into the rows the session registered, the bytes of
      the tokens each block holds, the aux row only with the first block of the first chunk, starting at
      source block ``sent_tokens // B``; then the status goes to the Language side
      (``sync_status_to_language_endpoint``, :369-380): Transferring when the remainder did not fit, else
      Success.

    ``fail`` is a write that returned an error (:441-461): the session is marked failed and Failed is
    sent; only a new registration of the session clears the mark, and a Language side registers once per
    connection. The Encode side never learns of a Language-side abort, so a queued chunk is written
    whenever the test lets it run, before or after the abort.
    """

    def __init__(
        self,
        address: str,
        network: Network,
        block_size: int,
        hidden_size: int,
        deepstack_layers: int = 0,
        engine_rank: int = 0,
    ):
        self.address = address
        self.pool = TorchBlockBuffers(256, block_size, hidden_size, deepstack_layers)  # its own buffers
        self.block_size, self.hidden_size, self.deepstack_layers = block_size, hidden_size, deepstack_layers
        self.sources: dict[int, Source] = {}
        self.infos: dict[int, TransferInfo] = {}
        self.next_block = 0
        self.language_args: dict[str, LanguageManager] = {}  # the registered sessions
        self.failed_sessions: set[str] = set()
        self.dead_workers: dict[int, str] = {}  # transfer queue -> what its worker raised
        self.failure_records: dict[int, str] = {}  # this side's own record of each failed room
        self.registrations: list[str] = []  # every session that registered (test instrumentation)
        self.writes: list[tuple[int, int]] = []  # (room, destination block) of every row written
        network.encode_sides[address] = self
        network.bootstrap_servers.setdefault(address, BootstrapServer()).put(address, 1, 1, engine_rank)

    def encode(self, room: int, total: int, seed: int) -> Source:
        """The encoder's output for ``room``, set into this side's own rows, aux row in the first one."""
        g = torch.Generator().manual_seed(seed)
        k, h, b = self.deepstack_layers, self.hidden_size, self.block_size
        deepstack = torch.randn(total, h * k, generator=g).bfloat16() if k else None
        blocks = list(range(self.next_block, self.next_block + -(-total // b)))
        self.next_block += len(blocks)
        source = Source(
            embeddings=torch.randn(total, h, generator=g).bfloat16(),
            fill_ids=torch.randint(0, 1 << 16, (total,), generator=g, dtype=torch.int32),
            mrope=torch.randint(0, 1 << 16, (3, total), generator=g, dtype=torch.int32),
            deepstack=deepstack,
            delta=-3 * room - 1,
            blocks=blocks,
        )
        for i, block in enumerate(blocks):
            lo, hi = i * b, min((i + 1) * b, total)
            ds = deepstack[lo:hi] if deepstack is not None else None
            self.pool.write_block(block, source.embeddings[lo:hi], source.fill_ids[lo:hi], source.mrope[:, lo:hi], ds)
        self.pool.write_aux(blocks[0], total, source.delta)
        self.sources[room] = source
        return source

    def on_message(self, fields: list[str], manager: LanguageManager) -> None:
        session = fields[3]
        if fields[0] == "None":
            self.language_args[session] = manager
            self.failed_sessions.discard(session)
            self.registrations.append(session)
            return
        room, indices = int(fields[0]), [int(i) for i in fields[4].split(",") if i]
        if len(fields) >= 8:  # a resume updates the existing destination (:524-560)
            info = self.infos[room]
            info.sent_tokens, info.allocated_tokens, info.dst_blocks = int(fields[6]), int(fields[7]), indices
            info.pending = True
        else:
            self.infos[room] = TransferInfo(manager, session, indices, int(fields[6]))

    def pending(self) -> list[int]:
        """Rooms with a chunk queued (served or not: a dead worker's queue keeps its chunks forever)."""
        return [room for room, info in self.infos.items() if info.pending]

    def queue_of(self, room: int) -> int:
        return int(self.infos[room].session.split(":")[1]) % TRANSFER_QUEUES

    def transfer(self, room: int) -> None:
        """The worker of ``room``'s queue takes its chunk (nothing happens when that worker is gone)."""
        info = self.infos[room]
        worker = self.queue_of(room)
        if worker in self.dead_workers:
            return
        info.pending = False
        if info.session in self.failed_sessions:
            self.failure_records[room] = (
                f"Language instance could be dead, remote mooncake session {info.session} is not alive"
            )
            info.manager.on_status_message(room, KVPoll.Failed)
            return
        source = self.sources[room]
        b = self.block_size  # this side's own, from its own fill-id rows (:423)
        try:
            if info.allocated_tokens // len(info.dst_blocks) != b:
                raise ValueError(f"Block size mismatch: Embedding side uses {b}")
            remaining = source.total - info.sent_tokens
            tokens = min(remaining, info.allocated_tokens)
            if -(-tokens // b) > len(info.dst_blocks):
                raise ValueError("Insufficient dst blocks")
        except Exception as error:  # the worker re-raises: its thread ends here
            self.dead_workers[worker] = f"RuntimeError: Transfer thread failed because of {error}"
            return
        self._write(room, info, source, tokens)
        info.sent_tokens += tokens
        status = KVPoll.Transferring if tokens < remaining else KVPoll.Success
        info.manager.on_status_message(room, status)

    def fail(self, room: int) -> None:
        info = self.infos[room]
        info.pending = False
        self.failed_sessions.add(info.session)
        self.failure_records[room] = f"Failed to send embedding chunk of {room}"
        info.manager.on_status_message(room, KVPoll.Failed)

    def run(self) -> None:
        """Every queued chunk whose worker is alive is taken, written and its status sent."""
        for room in self.pending():
            self.transfer(room)

    def _write(self, room: int, info: TransferInfo, source: Source, tokens: int) -> None:
        registered = self.language_args[info.session].data_args
        dst_ptrs, item_lens = registered.aux_data_ptrs, registered.aux_item_lens
        src_ptrs, _, src_item_lens = self.pool.get_buf_infos()
        assert item_lens == src_item_lens, "both sides agree on B, H and K"
        b = self.block_size
        start = info.sent_tokens // b
        pairs = list(zip(source.blocks[start:], info.dst_blocks[: -(-tokens // b)], strict=False))
        for i, (src, dst) in enumerate(pairs):
            n = min(b, tokens - i * b)
            for j, (dst_ptr, src_ptr, item) in enumerate(zip(dst_ptrs, src_ptrs, item_lens, strict=True)):
                if j == AUX_BUFFER:
                    if info.sent_tokens == 0 and i == 0:
                        ctypes.memmove(dst_ptr + dst * item, src_ptr + src * item, item)
                    continue
                ctypes.memmove(dst_ptr + dst * item, src_ptr + src * item, item * n // b)
            self.writes.append((room, dst))
