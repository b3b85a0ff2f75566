"""Fakes of the SGLang fork's code that meets the bridge: ZhengWG/sglang, branch vl-dis-1030, commit cca20b0.

Paths in the docstrings are under ``python/sglang/srt/``. Each fake reproduces what the cited lines do, the
fork's faults included (its receiver's ``abort()`` tells the Encode side nothing); only sockets, threads and
HTTP are gone: a message between the two sides is a method call, made when the test says it arrives. The
fakes also keep logs the fork does not (``remote_log``, ``writes``), for the tests to judge by; no fake
reads its own log to decide anything.
"""

from __future__ import annotations

import ctypes
import enum
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.fsm import KVPoll

AUX_BUFFER = 3  # the aux rows are the fourth buffer of get_buf_infos() (disaggregation/utils.py:567-592)
FAKE_BOOTSTRAP_HOST = "2.2.2.2"  # disaggregation/utils.py, FAKE_BOOTSTRAP_HOST


# ---- managers/schedule_batch.py and disaggregation/utils.py ------------------------------------------


class FinishAbort:
    """``FINISH_ABORT`` (managers/schedule_batch.py:156-169): why an aborted request finished."""

    def __init__(self, message: str | None = None, status_code: int | None = None, err_type: Any = None) -> None:
        self.message = message or "Aborted"
        self.status_code = status_code
        self.err_type = err_type


def prepare_abort(req: Req, error_message: str, status_code: int | None = None) -> None:
    """``prepare_abort`` (disaggregation/utils.py:482-495): the finish reason, and empty input logprobs."""
    req.finished_reason = FinishAbort(error_message, status_code)
    if req.return_logprob:
        req.input_token_logprobs_val = []
        req.input_token_logprobs_idx = []


class Modality(enum.Enum):
    """``Modality`` (managers/schedule_batch.py:172-190), the members the Language side names."""

    IMAGE = enum.auto()
    MULTI_IMAGES = enum.auto()
    VIDEO = enum.auto()
    AUDIO = enum.auto()


@dataclass
class MultimodalDataItem:
    """``MultimodalDataItem`` (managers/schedule_batch.py:192-215): a modality, optional features, and
    model-specific data readable as attributes."""

    modality: Modality
    hash: int | None = None
    pad_value: int | None = None
    offsets: list[Any] | None = None
    feature: Any = None
    precomputed_embeddings: Any = None
    model_specific_data: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        data = self.__dict__.get("model_specific_data", {})
        if name in data:
            return data[name]
        raise AttributeError(name)


@dataclass
class MultimodalInputs:
    """``MultimodalInputs`` (managers/schedule_batch.py:293-320): the items, and the M-RoPE fields."""

    mm_items: list[MultimodalDataItem]
    mrope_positions: torch.Tensor | None = None
    mrope_position_delta: torch.Tensor | None = None


@dataclass(eq=False)
class Req:
    """The fields of ``Req`` (managers/schedule_batch.py:433-675) the Language side reads and writes;
    ``embedding_indices`` defaults to an empty list (:675), so ``free_with_req`` is called for every one."""

    rid: str
    origin_input_ids: list[int]
    bootstrap_host: str = "10.0.0.1"
    bootstrap_room: int = 0
    data_parallel_rank: int | None = None
    return_logprob: bool = False
    input_embeds: Any = None
    multimodal_inputs: Any = None
    finished_reason: Any = None
    embedding_indices: list[int] = field(default_factory=list)
    prefix_indices: list[int] = field(default_factory=list)

    @property
    def fill_ids(self) -> list[int]:
        return self.origin_input_ids


# ---- disaggregation/mooncake/conn_multimodal.py: the Language side ------------------------------------


class EmbeddingTransferError(Exception):
    """``EmbeddingTransferError`` (disaggregation/mooncake/conn_multimodal.py:42-49): room and reason."""

    def __init__(self, room: int, reason: str) -> None:
        super().__init__(f"EmbeddingTransferError(bootstrap_room={room}): {reason}")


class BootstrapServer:
    """``MooncakeEmbeddingBootstrapServer`` (disaggregation/mooncake/conn_multimodal.py:1233-1324) as its
    routes answer: an Encode rank's ``PUT /route`` sets the sizes once and files the rank under
    ``(engine_rank // tp_size, engine_rank % tp_size)`` (:1270-1299); ``GET`` with ranks -1 answers the
    sizes, ``None`` while no Encode rank has registered (:1301-1313); any other ``GET`` looks the rank up,
    a missing one raising inside the handler, which the HTTP server answers with an error (:1315-1319)."""

    def __init__(self) -> None:
        self.tp_size: int | None = None
        self.dp_size: int | None = None
        self.ranks: dict[tuple[int, int], str] = {}  # (dp group, tp rank) -> the Encode rank's address

    def put(self, address: str, tp_size: int, dp_size: int, engine_rank: int) -> None:
        if self.tp_size is None:
            self.tp_size = tp_size
        if self.dp_size is None:
            self.dp_size = dp_size
        assert self.tp_size is not None
        self.ranks[(engine_rank // self.tp_size, engine_rank % self.tp_size)] = address


class Network:
    """Where each side's messages go: the Encode side behind each bootstrap address (ZMQ PUSH/PULL), and
    the bootstrap server at each address (HTTP)."""

    def __init__(self) -> None:
        self.encode_sides: dict[str, EncodeSide] = {}
        self.bootstrap_servers: dict[str, BootstrapServer] = {}
        self.unreachable: set[str] = set()  # bootstrap servers that do not answer

    def parallel_info(self, address: str) -> tuple[int, int] | None:
        """``_get_embedding_parallel_info_from_server`` (conn_multimodal.py:1067-1084): the Encode side's
        sizes, or None when the request raises, which includes ``int(None)`` on a server that answered
        before any Encode rank registered."""
        server = self.bootstrap_servers.get(address)
        if server is None or address in self.unreachable:
            return None  # the connection is refused
        try:
            return int(server.tp_size), int(server.dp_size)  # type: ignore[arg-type]
        except TypeError:
            return None

    def rank_info(self, address: str, tp_rank: int, dp_group: int) -> str | None:
        """``_get_bootstrap_info_from_server`` (conn_multimodal.py:1050-1065): None on any failure."""
        server = self.bootstrap_servers.get(address)
        if server is None or address in self.unreachable:
            return None
        return server.ranks.get((dp_group, tp_rank))


class LanguageManager:
    """``MooncakeEmbeddingManager`` in Language mode (disaggregation/mooncake/conn_multimodal.py:137-230).

    It registers the pool's buffers (``data_args``, :223-228), keeps one status per room
    (``request_status``), raised only upwards except to Failed (``update_status``, :765-775), and a failure
    record per room (:777-779). ``on_status_message`` is its listening thread (:632-642): a status the
    Encode side sent, with a record first when it is Failed. ``lose_connection`` is the heartbeat
    checker's ``_handle_node_failure`` (:810-841): Failed, set on this side alone, for every room of the
    address not yet Success, after forgetting the address's connections and sizes (:813-819), so that the
    next receiver for it asks the bootstrap server again and registers again.
    """

    def __init__(self, network: Network, buf_infos: tuple[list[int], list[int], list[int]], engine_rank: int = 0):
        ptrs, lens, item_lens = buf_infos
        self.network = network
        self.data_args = SimpleNamespace(
            aux_data_ptrs=ptrs, aux_data_lens=lens, aux_item_lens=item_lens, engine_rank=engine_rank
        )
        self.request_status: dict[int, KVPoll] = {}
        self.failure_records: dict[int, str] = {}
        self.failure_lock = threading.Lock()
        self.addr_to_rooms_tracker: defaultdict[str, set[int]] = defaultdict(set)
        self.tp_size, self.dp_size = 1, 1  # the Language side's own (server_args)
        self.connection_pool: dict[str, list[str]] = {}
        self.embedding_tp_size_table: dict[str, int] = {}
        self.embedding_dp_size_table: dict[str, int] = {}
        self.rank_port = 17001
        self.remote_log: list[tuple[int, KVPoll]] = []  # every status the Encode side sent (test instrumentation)

    def get_session_id(self) -> str:
        return f"language:{self.rank_port}"

    def check_status(self, room: int) -> KVPoll:
        return self.request_status[room]

    def update_status(self, room: int, status: KVPoll) -> None:
        if room not in self.request_status or status == KVPoll.Failed:
            self.request_status[room] = KVPoll(status)
        else:
            self.request_status[room] = KVPoll(max(self.request_status[room], status))

    def record_failure(self, room: int, reason: str) -> None:
        with self.failure_lock:
            self.failure_records[room] = reason

    def on_status_message(self, room: int, status: KVPoll) -> None:
        self.remote_log.append((room, KVPoll(status)))
        if status == KVPoll.Failed:
            self.record_failure(room, "Failed to get embedding data from embedding instance, it might be dead")
        self.update_status(room, status)

    def lose_connection(self, bootstrap_addr: str) -> list[int]:
        for key in [k for k in self.connection_pool if k.startswith(bootstrap_addr)]:
            del self.connection_pool[key]
        self.embedding_dp_size_table.pop(bootstrap_addr, None)
        affected = []
        for room in self.addr_to_rooms_tracker.pop(bootstrap_addr, set()):
            if room in self.request_status and self.check_status(room) != KVPoll.Success:
                self.record_failure(
                    room, f"Losing connection with embedding instance (bootstrap_addr: {bootstrap_addr})"
                )
                self.update_status(room, KVPoll.Failed)
                affected.append(room)
        return affected

    def remote_terminal(self, room: int) -> bool:
        """The Encode side has sent Success or Failed for ``room`` (judged from the log, by tests only)."""
        return any(r == room and s in (KVPoll.Success, KVPoll.Failed) for r, s in self.remote_log)


class MooncakeEmbeddingReceiver:
    """``MooncakeEmbeddingReceiver`` (disaggregation/mooncake/conn_multimodal.py:944-1230).

    The constructor sets Bootstrapping (:961). It asks the bootstrap server for the Encode side's sizes
    once per address (:965-986) and for the target rank once per connection key (address, dp group, tp
    rank), registering this side's buffers with that rank then, and only then (:1014-1042); either
    failure records the fork's text, sets Failed and returns early, leaving no ``bootstrap_infos``
    (:969-975, :1029-1034). Otherwise WaitingForInput (:1044-1048). ``init`` and ``resume_transfer`` send
    7 and 8 fields to the Encode side (:1118-1195). ``poll`` reads the manager's status and latches the
    first Failed or Success (:1197-1205); ``failure_exception`` pops the room's status, concludes Failed and
    raises with the popped record (:1207-1222); ``abort`` records a failure and concludes Failed on this
    side only, telling the Encode side nothing (:1224-1230).
    """

    def __init__(
        self, mgr: LanguageManager, bootstrap_addr: str, bootstrap_room: int | None = None, prefill_dp_rank: Any = None
    ) -> None:
        self.bootstrap_room = bootstrap_room
        self.bootstrap_addr = bootstrap_addr
        self.embedding_mgr = mgr
        self.session_id = mgr.get_session_id()
        room: int = bootstrap_room  # type: ignore[assignment]
        mgr.update_status(room, KVPoll.Bootstrapping)
        self.conclude_state: KVPoll | None = None
        if bootstrap_addr not in mgr.embedding_dp_size_table:
            sizes = mgr.network.parallel_info(bootstrap_addr)
            if sizes is None:
                record = f"Could not fetch embedding parallel info from bootstrap_addr: {bootstrap_addr}"
                mgr.record_failure(room, record)
                mgr.update_status(room, KVPoll.Failed)
                return
            mgr.embedding_tp_size_table[bootstrap_addr], mgr.embedding_dp_size_table[bootstrap_addr] = sizes
        tp_size, dp_size = mgr.embedding_tp_size_table[bootstrap_addr], mgr.embedding_dp_size_table[bootstrap_addr]
        local_tp = mgr.tp_size // mgr.dp_size
        if local_tp <= tp_size:
            target_tp_rank, self.required_dst_info_num = mgr.data_args.engine_rank % local_tp, 1
        else:
            target_tp_rank, self.required_dst_info_num = mgr.data_args.engine_rank % tp_size, local_tp // tp_size
        dp_group = prefill_dp_rank if prefill_dp_rank is not None else room % dp_size
        key = f"{bootstrap_addr}_{dp_group}_{target_tp_rank}"
        if key not in mgr.connection_pool:
            address = mgr.network.rank_info(bootstrap_addr, target_tp_rank, dp_group)
            if address is None:
                mgr.record_failure(
                    room,
                    f"Could not fetch bootstrap info for engine rank: {mgr.data_args.engine_rank} "
                    f"and target_dp_group: {dp_group}",
                )
                mgr.update_status(room, KVPoll.Failed)
                return
            self.bootstrap_infos = [address]
            mgr.connection_pool[key] = self.bootstrap_infos
            self._send(["None", "host", str(mgr.rank_port), self.session_id, "pointers"])  # the registration
        else:
            self.bootstrap_infos = mgr.connection_pool[key]
        mgr.addr_to_rooms_tracker[bootstrap_addr].add(room)
        mgr.update_status(room, KVPoll.WaitingForInput)

    def _send(self, fields: list[str]) -> None:
        for address in self.bootstrap_infos:  # AttributeError after a failed bootstrap, as in the fork
            self.embedding_mgr.network.encode_sides[address].on_message(fields, self.embedding_mgr)

    def init(self, embedding_indices: list[int] | None = None, allocated_tokens: int | None = None) -> None:
        indices = ",".join(str(i) for i in embedding_indices or [])
        if allocated_tokens is None and embedding_indices is not None:
            allocated_tokens = len(embedding_indices) * (self.embedding_mgr.data_args.aux_item_lens[1] // 4)
        room, session = str(self.bootstrap_room), self.session_id
        self._send([room, "host", "port", session, indices, str(self.required_dst_info_num), str(allocated_tokens)])

    def resume_transfer(self, embedding_indices: list[int], sent_tokens: int, allocated_tokens: int) -> None:
        indices = ",".join(str(i) for i in embedding_indices)
        room, session, n = str(self.bootstrap_room), self.session_id, str(self.required_dst_info_num)
        self._send([room, "host", "port", session, indices, n, str(sent_tokens), str(allocated_tokens)])

    def poll(self) -> KVPoll:
        if self.conclude_state is not None:
            return self.conclude_state
        status = self.embedding_mgr.check_status(self.bootstrap_room)  # type: ignore[arg-type]
        if status in (KVPoll.Success, KVPoll.Failed):
            self.conclude_state = status
        return status

    def clear(self) -> None:
        self.embedding_mgr.request_status.pop(self.bootstrap_room, None)  # type: ignore[arg-type]

    def failure_exception(self) -> None:
        self.clear()
        if self.conclude_state is None:
            self.conclude_state = KVPoll.Failed
        with self.embedding_mgr.failure_lock:
            reason = self.embedding_mgr.failure_records.pop(
                self.bootstrap_room,  # type: ignore[arg-type]
                "Failed due to an unknown reason from another rank",
            )
        raise EmbeddingTransferError(self.bootstrap_room, reason)  # type: ignore[arg-type]

    def abort(self) -> None:
        self.embedding_mgr.record_failure(self.bootstrap_room, "Aborted by AbortReq.")  # type: ignore[arg-type]
        self.conclude_state = KVPoll.Failed


class FakeKVReceiver:
    """``FakeKVReceiver`` (disaggregation/fake/conn.py:76-109), the warm-up requests' receiver: ready at
    once, Success after ``init``, never writes, and has no ``abort``."""

    def __init__(
        self, mgr: Any, bootstrap_addr: str, bootstrap_room: int | None = None, prefill_dp_rank: Any = None
    ) -> None:
        self.has_init = False

    def poll(self) -> KVPoll:
        return KVPoll.Success if self.has_init else KVPoll.WaitingForInput

    def init(self, embedding_indices: list[int] | None = None, allocated_tokens: int | None = None, **_: Any) -> None:
        self.has_init = True

    def failure_exception(self) -> None:
        raise Exception("Fake KVReceiver Exception")


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


# ---- managers/scheduler.py and friends: the Language-side scheduler --------------------------------


class LanguageScheduler:
    """The parts of the fork's ``Scheduler`` in Language mode that meet the Language-side queues.

    Requests enter the prealloc queue (managers/scheduler.py:1540-1541); ``process_multimodal_language_queue``
    is the fork's, line for line (disaggregation/multimodal_language.py:568-572); ``abort_request`` is its
    waiting-queue part (managers/scheduler.py:2555-2585, ``free_with_req`` when ``embedding_indices`` is not
    None) and its Language part (:2642-2656, ``abort()`` on every entry of both queues that has one);
    ``load_tokens`` is its load report (:2438-2455, ``req.req.origin_input_ids`` on prealloc entries);
    ``run_prefill`` takes every waiting request into one extend batch (managers/schedule_batch.py:1260-1290,
    1372-1393: each ``input_embeds`` sliced by the prompt, each ``mm_items`` iterated)
    and frees after it (managers/scheduler_output_processor_mixin.py:140-146).
    """

    def __init__(self, hidden_size: int, deepstack_layers: int = 0, attn_tp_cpu_group: Any = None) -> None:
        vision = SimpleNamespace(deepstack_visual_indexes=list(range(deepstack_layers)))
        self.model_config = SimpleNamespace(hidden_size=hidden_size, hf_config=SimpleNamespace(vision_config=vision))
        self.attn_tp_cpu_group = attn_tp_cpu_group
        self.tp_rank = 0
        self.enable_metrics = False
        self.waiting_queue: list[Req] = []
        self.streamed: list[Req] = []  # every request stream_output answered
        self.aborted_outputs: list[str] = []  # rids answered with AbortReq from the waiting queue
        self.batches: list[SimpleNamespace] = []
        # set by the Language branch of the constructor (managers/scheduler.py:987-1022), or by install()
        self.disagg_language_prealloc_queue: Any = None
        self.disagg_language_transfer_queue: Any = None
        self.req_to_metadata_buffer_idx_allocator: Any = None
        self.disagg_metadata_buffers: Any = None

    def process_input_requests(self, reqs: list[Req]) -> None:
        for req in reqs:
            self.disagg_language_prealloc_queue.add(req)

    def process_multimodal_language_queue(self) -> None:
        req_conns = self.disagg_language_prealloc_queue.pop_preallocated()
        self.disagg_language_transfer_queue.extend(req_conns)
        alloc_reqs = self.disagg_language_transfer_queue.pop_transferred()
        self.waiting_queue.extend(alloc_reqs)

    def stream_output(self, reqs: list[Req], return_logprob: bool) -> None:
        self.streamed.extend(reqs)

    def abort_request(self, rid: str) -> None:
        for i in reversed([i for i, req in enumerate(self.waiting_queue) if req.rid.startswith(rid)]):
            req = self.waiting_queue.pop(i)
            self.aborted_outputs.append(req.rid)
            if req.embedding_indices is not None:
                self.req_to_metadata_buffer_idx_allocator.free_with_req(req)
        for language_req in self.disagg_language_prealloc_queue.queue:
            if language_req.req.rid.startswith(rid) and hasattr(language_req.embedding_receiver, "abort"):
                language_req.embedding_receiver.abort()
        for language_req in self.disagg_language_transfer_queue.queue:
            if language_req.req.rid.startswith(rid) and hasattr(language_req.embedding_receiver, "abort"):
                language_req.embedding_receiver.abort()

    def load_tokens(self) -> int:
        tokens = sum(len(req.origin_input_ids) for req in self.waiting_queue)
        return tokens + sum(len(entry.req.origin_input_ids) for entry in self.disagg_language_prealloc_queue.queue)

    def run_prefill(self, on_batch: Callable[[SimpleNamespace], None] | None = None) -> list[Req]:
        """One extend batch of every waiting request, then the free path of a finished prefill."""
        reqs, self.waiting_queue = self.waiting_queue, []
        if not reqs:
            return []
        batch = _prepare_for_extend(reqs)
        if on_batch is not None:
            on_batch(batch)
        for req in reqs:
            if req.embedding_indices is not None:
                self.req_to_metadata_buffer_idx_allocator.free_with_req(req)
        return reqs


def _prepare_for_extend(reqs: list[Req]) -> SimpleNamespace:
    """managers/schedule_batch.py:1260-1290 and 1372-1393, on CPU: the embeddings of the batch (sliced from
    each request's ``input_embeds``) and every multimodal input's items visited."""
    input_embeds: Any = []
    multimodal_inputs = []
    for req in reqs:
        if req.input_embeds is not None:
            chunk = req.input_embeds[len(req.prefix_indices) : len(req.fill_ids)]
            input_embeds = chunk if isinstance(input_embeds, list) else torch.cat([input_embeds, chunk], dim=0)
        multimodal_inputs.append(req.multimodal_inputs)
    for mm_input in multimodal_inputs:
        if mm_input is None:
            continue
        for mm_item in mm_input.mm_items:
            feature = getattr(mm_item, "feature", None)
            if isinstance(feature, torch.Tensor):
                mm_item.feature = feature.to("cpu")
    return SimpleNamespace(input_embeds=input_embeds, multimodal_inputs=multimodal_inputs)
