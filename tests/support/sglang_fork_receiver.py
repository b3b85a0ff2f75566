"""Fakes of the SGLang fork's receiver side of a transfer: ZhengWG/sglang, branch vl-dis-1030, commit cca20b0.

The Language side's Mooncake receiver and its manager, the bootstrap server they ask for the Encode
side's sizes and ranks, the network between the two sides, and the warm-up requests' receiver. The
Encode side they talk to is in ``sglang_fork_encode.py``, the scheduler in ``sglang_fork_scheduler.py``.

Paths in the docstrings are under ``python/sglang/srt/``. Each fake reproduces what the cited lines do, the
fork's faults included (its receiver's ``abort()`` tells the Encode side nothing); only sockets, threads and
HTTP are gone: a message between the two sides is a method call, made when the test says it arrives. The
fakes also keep logs the fork does not (``remote_log``), for the tests to judge by; no fake reads its own
log to decide anything.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from epd_receiver.fsm import KVPoll

if TYPE_CHECKING:
    from support.sglang_fork_encode import EncodeSide


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
