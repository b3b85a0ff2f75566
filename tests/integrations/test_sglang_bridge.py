"""The SGLang bridge installed in a scheduler of the fork's exact shape, driven as the fork drives it.

The scheduler, the Mooncake receiver and its manager, the warm-up receiver, the Encode side and the
prefill are fakes of the fork's code (``sglang_fork.py``, each citing the lines it reproduces). The Encode
side learns where to write only from the pool's registered ``get_buf_infos()`` and moves raw bytes by
pointer, as the Mooncake sender does, and it never hears of a Language-side abort, as in the fork.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.distributed as dist
from sglang_fork import (
    BootstrapServer,
    FakeKVReceiver,
    FinishAbort,
    LanguageManager,
    LanguageScheduler,
    Modality,
    MooncakeEmbeddingReceiver,
    MultimodalDataItem,
    MultimodalInputs,
    Network,
    Req,
    Source,
    prepare_abort,
)
from sglang_fork import EncodeSide as ForkEncodeSide

from epd_receiver.adapters.integrations.sglang.bridge import (
    FAKE_BOOTSTRAP_HOST,
    EmbeddingBridge,
    LanguageEntry,
    PromptKind,
    classify,
)
from epd_receiver.adapters.integrations.sglang.install import install, receiver_factory
from epd_receiver.adapters.integrations.sglang.link import ReceiverLink, remote_evidence
from epd_receiver.adapters.integrations.sglang.mm import MultimodalInputsLike, sglang_multimodal_inputs
from epd_receiver.adapters.ports import payload
from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.clock import ManualClock
from epd_receiver.adapters.ports.payload import PayloadArena, storage_unshared
from epd_receiver.adapters.ports.ranks import GlooRankGroup, RankContext, RankProcesses
from epd_receiver.fsm import KVPoll, ReceiverConfig

B, H, K, N, D = 4, 8, 2, 16, 8  # block size, hidden size, deepstack layers, pool blocks, default tokens
PORT = 8998
SLOW, FAST = "10.0.0.1", "10.0.0.2"  # two Encode instances: one whose writes come late, one prompt
BROKEN = "10.0.0.3"  # a third, whose write is refused in the loop test (which poisons its session there)
FORK_MM = sglang_multimodal_inputs(MultimodalInputs, MultimodalDataItem, Modality.IMAGE)


# ---- the harness: the fork's scheduler with the bridge installed -----------------------------------


class Fork:
    def __init__(
        self,
        *,
        num_blocks: int = N,
        deepstack_layers: int = 0,
        link_factory: Callable[..., Any] = ReceiverLink,
        multimodal_inputs: Any = FORK_MM,
        group: Any = None,
        **timeouts: float,
    ) -> None:
        self.network = Network()
        self.clock = ManualClock()
        self.scheduler = LanguageScheduler(H, deepstack_layers, attn_tp_cpu_group=group)
        self.encode = {
            host: ForkEncodeSide(f"{host}:{PORT}", self.network, B, H, deepstack_layers)
            for host in (SLOW, FAST, BROKEN)
        }
        environ = {
            "SGLANG_EMBEDDING_CACHE_BUFFER_SIZE": str(num_blocks),
            "SGLANG_EMBEDDING_CACHE_BLOCK_SIZE": str(B),
            "SGLANG_EMBEDDING_DEFAULT_ALLOCATE_BUFFER_SIZE": str(D),
        }
        self.bridge: EmbeddingBridge = install(
            self.scheduler,
            connect=self._connect,
            prepare_abort=prepare_abort,
            receiver_config=ReceiverConfig(default_alloc_tokens=D, **timeouts),  # type: ignore[arg-type]
            clock=self.clock,
            multimodal_inputs=multimodal_inputs,
            environ=environ,
            link_factory=link_factory,
        )

    def _connect(self, buf_infos: tuple[list[int], list[int], list[int]]) -> Callable[[Any], Any]:
        """As the fork's Language branch would: the manager registers the pool, receivers share it."""
        self.manager = LanguageManager(self.network, buf_infos)
        return receiver_factory(self.manager, MooncakeEmbeddingReceiver, FakeKVReceiver, PORT)

    def arrive(self, room: int, total: int, own_length: int, host: str = FAST) -> Req:
        self.encode[host].encode(room, total, seed=room)
        req = Req(f"r{room}", list(range(own_length)), bootstrap_host=host, bootstrap_room=room)
        self.scheduler.process_input_requests([req])
        return req

    def warmup(self, room: int) -> Req:
        req = Req(f"w{room}", [0], bootstrap_host=FAKE_BOOTSTRAP_HOST, bootstrap_room=room)
        self.scheduler.process_input_requests([req])
        return req

    def source(self, req: Req) -> Source:
        return self.encode[req.bootstrap_host].sources[req.bootstrap_room]

    def iterate(self, times: int = 1, *, deliver: bool = True) -> None:
        for _ in range(times):
            if deliver:
                for side in self.encode.values():
                    side.run()  # the Encode sides make progress between scheduler iterations
            self.scheduler.process_multimodal_language_queue()

    def entry(self, req: Req) -> LanguageEntry:
        queues = (self.scheduler.disagg_language_prealloc_queue, self.scheduler.disagg_language_transfer_queue)
        (found,) = [e for q in queues for e in q.queue if e.req is req]
        return found

    def assert_clean(self) -> None:
        """Nothing leaks: every block free, nothing in flight, no payload held or lent."""
        assert self.bridge.allocator.free_count == self.bridge.config.num_blocks
        assert self.bridge.allocator.fenced_count == 0 and self.bridge.in_flight == 0
        assert self.bridge.held_payloads == 0 and self.bridge.arena.lent == 0
        assert len(self.scheduler.disagg_language_prealloc_queue) == len(self.scheduler.disagg_language_transfer_queue)
        assert len(self.scheduler.disagg_language_prealloc_queue) == 0


def delivered_mismatch(req: Req, source: Source) -> str | None:
    """What differs between a delivered request and what its sender sent, or None."""
    if req.origin_input_ids != source.fill_ids.tolist():
        return "fill ids"
    if req.input_embeds is None or not torch.equal(req.input_embeds, source.input_embeds()):
        return "embeddings"
    mm = req.multimodal_inputs
    if mm is not None:
        if not torch.equal(mm.mrope_positions, source.mrope):
            return "M-RoPE positions"
        if mm.mrope_position_delta.tolist() != [[source.delta]]:
            return "M-RoPE delta"
    return None


def aborted_with_500(req: Req) -> str:
    assert isinstance(req.finished_reason, FinishAbort) and req.finished_reason.status_code == 500
    return req.finished_reason.message


# ---- layout and classification ---------------------------------------------------------------------


def test_kvpoll_values_are_sglangs() -> None:
    assert {p.name: int(p) for p in KVPoll} == {
        "Failed": 0,
        "Bootstrapping": 1,
        "WaitingForInput": 2,
        "Transferring": 3,
        "Success": 4,
    }


@pytest.mark.parametrize("deepstack_layers", [0, 2])
def test_buf_infos_list_the_buffers_in_the_original_order_deepstack_last(deepstack_layers: int) -> None:
    pool = TorchBlockBuffers(N, B, H, deepstack_layers)
    ptrs, data_lens, item_lens = pool.get_buf_infos()
    tensors = [pool.embeddings, pool.fill_ids, pool.mrope_positions, pool.aux]
    tensors += [pool.deepstack] if pool.deepstack is not None else []
    assert ptrs == [t.data_ptr() for t in tensors]
    assert data_lens == [N * i for i in item_lens]
    expected = [B * H * 2, B * 4, 3 * B * 4, 16 * 4] + ([B * H * deepstack_layers * 2] if deepstack_layers else [])
    assert item_lens == expected
    assert item_lens[1] // 4 == B  # the sender derives B this way


def test_prompts_are_classified_by_the_language_sides_own_length() -> None:
    assert classify(10, 10) is PromptKind.TEXT_ONLY
    assert classify(3, 10) is PromptKind.MULTIMODAL
    assert classify(11, 10) is PromptKind.MISMATCH


# ---- install: one pool, the fork's attributes ------------------------------------------------------


def test_install_leaves_one_pool_registered_and_the_forks_attributes_in_place() -> None:
    fork = Fork(deepstack_layers=K)
    s, bridge = fork.scheduler, fork.bridge
    assert s.disagg_metadata_buffers is bridge.buffers  # the only pool: the one the transport registered
    assert fork.manager.data_args.aux_data_ptrs == bridge.get_buf_infos()[0]
    assert bridge.buffers.deepstack_layers == K and bridge.config.hidden_size == H  # from model_config
    assert (bridge.config.num_blocks, bridge.config.block_size, bridge.config.default_allocate_tokens) == (N, B, D)
    assert s.req_to_metadata_buffer_idx_allocator is bridge.releaser
    assert s.disagg_language_prealloc_queue is bridge.prealloc_queue
    assert s.disagg_language_transfer_queue is bridge.transfer_queue
    assert bridge.queue.rank_count == 1  # no attention-TP group: a single rank
    assert not hasattr(s.disagg_language_transfer_queue, "pop_failed")  # the fork's loop would never call it


def test_install_refuses_a_scheduler_that_built_the_forks_own_queues() -> None:
    scheduler = LanguageScheduler(H)
    scheduler.disagg_language_prealloc_queue = type("ForkQueue", (), {"data_manager": object()})()
    with pytest.raises(ValueError, match="instead of building them"):
        install(scheduler, connect=lambda infos: lambda req: None, prepare_abort=prepare_abort)


# ---- the fork's loop: deliveries, entries, load, prefill -------------------------------------------


def test_the_fork_loop_delivers_text_multimodal_resumed_and_warm_up_requests() -> None:
    fork = Fork()
    text = fork.arrive(1, total=6, own_length=6)  # fits A0, nothing expanded
    image = fork.arrive(2, total=7, own_length=3)  # fits A0, placeholders expanded
    long = fork.arrive(3, total=21, own_length=5)  # T > D: the first chunk, then a resume of 13 tokens
    warm = fork.warmup(4)
    assert fork.scheduler.load_tokens() == 6 + 3 + 5 + 1  # the load report reads entry.req.origin_input_ids
    fork.iterate(6)

    assert set(map(id, fork.scheduler.waiting_queue)) == {id(text), id(image), id(long), id(warm)}
    assert fork.scheduler.streamed == []
    for req in (text, image, long):
        assert delivered_mismatch(req, fork.source(req)) is None
    assert text.multimodal_inputs is None and warm.input_embeds is None and warm.origin_input_ids == [0]
    for req in (image, long):
        mm = req.multimodal_inputs
        assert isinstance(mm, MultimodalInputs) and [i.modality for i in mm.mm_items] == [Modality.IMAGE]
        assert mm.mm_items[0].model_specific_data == {}
        assert mm.mrope_positions.dtype == torch.int32 and mm.mrope_positions.shape == (3, fork.source(req).total)
        assert mm.mrope_position_delta.dtype == torch.int32 and mm.mrope_position_delta.shape == (1, 1)
    batch = fork.scheduler.run_prefill()  # the first multimodal prefill iterates mm_items and slices embeds
    assert len(batch) == 4 and fork.scheduler.waiting_queue == []
    fork.assert_clean()


def test_without_sglang_the_default_multimodal_inputs_have_the_same_shape() -> None:
    fork = Fork(multimodal_inputs=None)  # install picks SGLang's classes only when SGLang is importable
    req = fork.arrive(1, total=7, own_length=2)
    fork.iterate(3)
    mm = req.multimodal_inputs
    assert isinstance(mm, MultimodalInputsLike) and mm.contains_image_inputs()
    assert [(item.model_specific_data, item.feature) for item in mm.mm_items] == [({}, None)]
    assert mm.mrope_position_delta.dtype == torch.int32
    assert mm.mrope_position_delta.tolist() == [[fork.source(req).delta]]
    fork.scheduler.run_prefill()
    fork.assert_clean()


def test_entries_have_the_forks_shape_and_keep_their_blocks() -> None:
    fork = Fork()
    req = fork.arrive(1, total=21, own_length=5)
    entry = fork.entry(req)
    assert entry.req is req and entry.embedding_indices is None and hasattr(entry.embedding_receiver, "abort")
    assert isinstance(entry.embedding_receiver.receiver, MooncakeEmbeddingReceiver)
    fork.iterate(1, deliver=False)  # the handshake is done at once, A0 granted, init sent
    fork.iterate(1, deliver=False)
    assert entry in fork.scheduler.disagg_language_transfer_queue.queue
    a0 = list(fork.encode[FAST].infos[1].dst_blocks)
    assert entry.embedding_indices == a0 and len(a0) == D // B
    fork.iterate(1)  # the first chunk lands: A0 is read and freed, the remainder's blocks are granted
    assert entry.embedding_indices == fork.encode[FAST].infos[1].dst_blocks != a0
    fork.iterate(2)
    assert fork.scheduler.waiting_queue == [req] and req.embedding_indices == []


def test_deepstack_is_joined_to_the_embeddings_on_the_last_dimension() -> None:
    fork = Fork(deepstack_layers=K)
    req = fork.arrive(1, total=13, own_length=2)
    fork.iterate(4)
    assert req.input_embeds.shape == (13, H * (1 + K))
    assert delivered_mismatch(req, fork.source(req)) is None


def test_a_full_pool_holds_later_requests_in_the_prealloc_queue() -> None:
    fork = Fork(num_blocks=2)  # room for exactly one A0
    first = fork.arrive(1, total=8, own_length=1)
    second = fork.arrive(2, total=8, own_length=1)
    fork.iterate(2, deliver=False)
    assert len(fork.bridge.prealloc_queue) == 1 and len(fork.bridge.transfer_queue) == 1
    fork.iterate(4)
    assert fork.scheduler.waiting_queue == [first, second]


# ---- failures: answered inside pop_transferred, the fork's way --------------------------------------


def test_a_sender_failure_is_answered_inside_pop_transferred_with_prepare_abort_and_stream_output() -> None:
    fork = Fork()
    req = fork.arrive(1, total=21, own_length=5)
    fork.iterate(2, deliver=False)
    fork.encode[FAST].fail(1)  # the Encode side's write failed: it reports Failed
    answered: list[int] = []
    transfer = fork.scheduler.disagg_language_transfer_queue
    pop = transfer.pop_transferred

    def watched() -> list[Any]:
        ready = pop()
        answered.append(len(fork.scheduler.streamed))
        return ready

    transfer.pop_transferred = watched
    fork.iterate(1, deliver=False)
    assert answered == [1] and fork.scheduler.streamed == [req]  # in the same call, once
    message = aborted_with_500(req)
    assert "SenderFailed" in message or "sender" in message.lower()
    assert "Failed to get embedding data" in message  # the fork's failure record, via failure_exception()
    assert fork.bridge.allocator.fenced_count == 0  # the Encode side said it stopped: nothing to fence
    fork.assert_clean()


def test_after_one_refused_write_the_encode_side_fails_the_sessions_every_request_and_nothing_is_fenced() -> None:
    """The fork's Encode side marks the Language session failed at the first refused write and from then on
    fails every chunk of it without writing, until the session registers again, which a Language side
    does once per connection (or after losing the address's heartbeat). Each of those Failed statuses is
    the Encode side's own word: the bridge answers the requests and fences nothing."""
    fork = Fork()
    side, session = fork.encode[SLOW], fork.manager.get_session_id()
    resumed = fork.arrive(1, total=21, own_length=5, host=SLOW)
    fork.iterate(2)  # its first chunk landed, its resume is queued on the Encode side
    assert side.writes and fork.bridge.queue.get(1).resumes == 1  # type: ignore[union-attr]
    refused = fork.arrive(2, total=8, own_length=2, host=SLOW)
    fork.iterate(1, deliver=False)
    side.fail(2)  # one refused write: the session is poisoned on this Encode side
    assert side.failed_sessions == {session}
    later = [fork.arrive(room, total=total, own_length=2, host=SLOW) for room, total in ((3, 8), (4, 13))]
    prompt = fork.arrive(5, total=9, own_length=3)  # another Encode side: unaffected
    written = len(side.writes)
    for _ in range(5):
        fork.iterate(1)
        assert fork.bridge.allocator.fenced_count == 0  # every Failed came from the Encode side: no fence
    assert len(side.writes) == written  # the resume and both later requests: nothing written
    assert fork.scheduler.streamed == [resumed, refused, *later]
    for req in (resumed, refused, *later):
        assert "Failed to get embedding data" in aborted_with_500(req)
    dead = f"Language instance could be dead, remote mooncake session {session} is not alive"
    assert {room: side.failure_records[room] for room in (1, 3, 4)} == dict.fromkeys((1, 3, 4), dead)
    assert side.registrations == [session]  # registered once: nothing lifted the mark
    assert fork.scheduler.waiting_queue == [prompt] and delivered_mismatch(prompt, fork.source(prompt)) is None
    fork.scheduler.run_prefill()
    fork.assert_clean()

    fork.manager.lose_connection(f"{SLOW}:{PORT}")  # the heartbeat gave up: the address is asked for again
    again = fork.arrive(6, total=8, own_length=2, host=SLOW)
    fork.iterate(3)
    assert side.registrations == [session, session] and side.failed_sessions == set()
    assert fork.scheduler.waiting_queue == [again] and delivered_mismatch(again, fork.source(again)) is None
    fork.scheduler.run_prefill()
    fork.assert_clean()


def test_a_block_size_mismatch_ends_the_encode_workers_thread_and_the_deadlines_answer_and_unfence() -> None:
    """The fork's block-size check raises inside the transfer worker, which dies: no status is ever sent
    for the room, and the chunks queued behind it (the same session's) are never taken. Only the bridge's
    deadlines end it: the transfer deadline fails the requests, whose blocks stay fenced (nothing says
    the Encode side stopped) until the drain deadline."""
    fork = Fork(transfer_timeout_s=TRANSFER_TIMEOUT, drain_timeout_s=DRAIN)
    odd = ForkEncodeSide(f"{SLOW}:{PORT}", fork.network, 2 * B, H)  # its blocks hold 2B tokens, ours B
    fork.encode[SLOW] = odd
    first = fork.arrive(1, total=8, own_length=2, host=SLOW)
    fork.iterate(3)
    assert list(odd.dead_workers.values()) == [
        "RuntimeError: Transfer thread failed because of Block size mismatch: Embedding side uses 8"
    ]
    behind = fork.arrive(2, total=6, own_length=2, host=SLOW)  # the same session: the same dead queue
    prompt = fork.arrive(3, total=7, own_length=7)
    fork.iterate(3)
    assert odd.pending() == [2] and odd.writes == []  # room 1's chunk went down with the worker; 2's waits
    assert [room for room, _ in fork.manager.remote_log if room in (1, 2)] == []  # no status, ever
    assert fork.scheduler.waiting_queue == [prompt] and fork.scheduler.streamed == []
    fork.scheduler.run_prefill()
    held = {room: tuple(sorted(fork.bridge.queue.get(room).blocks)) for room in (1, 2)}  # type: ignore[union-attr]

    fork.clock.advance(TRANSFER_TIMEOUT + 1)
    fork.iterate(1)
    assert set(fork.scheduler.streamed) == {first, behind}
    assert all("TRANSFERRING for more than" in aborted_with_500(req) for req in (first, behind))
    assert fork.bridge.allocator.fences() == held
    fork.clock.advance(DRAIN - 1)
    fork.iterate(2)
    assert fork.bridge.allocator.fences() == held  # still nothing from the Encode side
    fork.clock.advance(2)
    fork.iterate(1)
    assert fork.bridge.allocator.fences() == {} and odd.writes == []
    assert fork.manager.request_status == {3: KVPoll.Success} and fork.manager.failure_records == {}
    fork.assert_clean()


def test_a_prompt_longer_than_its_expansion_is_answered_and_frees_everything() -> None:
    fork = Fork()
    req = fork.arrive(1, total=5, own_length=9)
    fork.iterate(3)
    assert fork.scheduler.waiting_queue == [] and fork.scheduler.streamed == [req]
    assert "SizeMismatch" in aborted_with_500(req) or "expansion" in aborted_with_500(req)
    fork.assert_clean()


ELSEWHERE = "10.0.0.7"  # an address no Encode side of the harness serves


@pytest.mark.parametrize("case", ["no server answers", "no Encode rank registered yet", "no such rank"])
def test_a_failed_bootstrap_is_answered_with_the_forks_record_and_holds_nothing(case: str) -> None:
    fork = Fork()
    address = f"{ELSEWHERE}:{PORT}"
    if case == "no server answers":
        fork.network.unreachable.add(address)
        record = f"Could not fetch embedding parallel info from bootstrap_addr: {address}"
    elif case == "no Encode rank registered yet":  # its sizes are None: int(None) raises inside the fetch
        fork.network.bootstrap_servers[address] = BootstrapServer()
        record = f"Could not fetch embedding parallel info from bootstrap_addr: {address}"
    else:  # an Encode rank filed under dp group 1; a tp-1 dp-1 Language rank asks for group 0
        ForkEncodeSide(address, fork.network, B, H, engine_rank=1)
        record = "Could not fetch bootstrap info for engine rank: 0 and target_dp_group: 0"
    req = Req("r1", [0], bootstrap_host=ELSEWHERE, bootstrap_room=1)
    fork.scheduler.process_input_requests([req])
    receiver = fork.entry(req).embedding_receiver.receiver
    assert not hasattr(receiver, "bootstrap_infos")  # the fork's constructor returned early
    assert fork.manager.request_status[1] == KVPoll.Failed and fork.manager.failure_records[1] == record
    fork.iterate(2)
    assert fork.scheduler.streamed == [req] and record in aborted_with_500(req)
    assert 1 not in fork.manager.request_status and 1 not in fork.manager.failure_records
    fork.assert_clean()


def test_a_receiver_that_cannot_be_built_is_answered_at_the_next_iteration() -> None:
    fork = Fork()

    def broken(req: Any) -> Any:
        raise OSError("bootstrap server unreachable")

    fork.bridge.receiver_factory = broken
    req = fork.arrive(1, total=8, own_length=1)
    assert fork.entry(req).embedding_receiver is None  # nothing the abort handler could reach
    fork.scheduler.abort_request("r1")
    fork.iterate(1)
    assert fork.scheduler.streamed == [req] and "unreachable" in aborted_with_500(req)
    fork.assert_clean()


# ---- aborts through the scheduler's own handler -----------------------------------------------------


def test_the_schedulers_abort_fails_the_request_and_fences_its_blocks_while_the_sender_may_write() -> None:
    fork = Fork()
    req = fork.arrive(1, total=8, own_length=2, host=SLOW)
    fork.iterate(2, deliver=False)
    entry = fork.entry(req)
    held = list(entry.embedding_indices or [])
    fork.scheduler.abort_request("r1")  # managers/scheduler.py:2652-2656: entry.embedding_receiver.abort()
    receiver = entry.embedding_receiver.receiver
    assert receiver.conclude_state == KVPoll.Failed  # the fork's receiver concluded Failed, locally
    assert fork.manager.failure_records[1] == "Aborted by AbortReq."
    assert fork.bridge.allocator.fences() == {1: tuple(sorted(held))}
    fork.iterate(1, deliver=False)
    assert fork.scheduler.streamed == [req] and "aborted" in aborted_with_500(req)
    fork.iterate(3, deliver=False)
    assert fork.bridge.allocator.fences() == {1: tuple(sorted(held))}  # its own Failed lifts nothing
    # the fork's queue would have popped the room's status and record when it reported the request; kept
    # while fenced, the status is where the Encode side's word arrives
    assert fork.manager.request_status[1] == KVPoll.WaitingForInput
    assert fork.manager.failure_records[1] == "Aborted by AbortReq."
    fork.encode[SLOW].run()  # the Encode side never heard of the abort: it writes, then says Success
    fork.iterate(1, deliver=False)
    assert 1 not in fork.manager.request_status and 1 not in fork.manager.failure_records  # retired: cleared
    fork.assert_clean()


def test_an_abort_before_the_first_allocation_is_answered_and_fences_nothing() -> None:
    fork = Fork(num_blocks=2)
    first = fork.arrive(1, total=8, own_length=1)
    waiting = fork.arrive(2, total=8, own_length=1)
    fork.iterate(1, deliver=False)
    fork.scheduler.abort_request("r2")  # still in the prealloc queue
    fork.iterate(1, deliver=False)
    assert fork.scheduler.streamed == [waiting] and fork.bridge.allocator.fenced_count == 0
    fork.iterate(2)
    assert fork.scheduler.waiting_queue == [first]


def test_a_warm_up_request_passes_through_and_its_receiver_has_no_abort() -> None:
    fork = Fork()
    req = fork.warmup(9)
    assert not hasattr(fork.entry(req).embedding_receiver.receiver, "abort")
    fork.iterate(3)
    assert fork.scheduler.waiting_queue == [req] and fork.bridge.allocator.free_count == N


# ---- payload memory: free_with_req, and no tensor reused under a Req --------------------------------


def test_free_with_req_gives_the_payload_back_once_and_ignores_other_requests(caplog: pytest.LogCaptureFixture) -> None:
    fork = Fork()
    req = fork.arrive(1, total=21, own_length=5)
    fork.iterate(4)
    releaser = fork.scheduler.req_to_metadata_buffer_idx_allocator
    assert fork.bridge.held_payloads == 1 and fork.bridge.arena.lent == 1
    releaser.free_with_req(req)
    assert fork.bridge.held_payloads == 0 and fork.bridge.arena.lent == 0
    with caplog.at_level(logging.DEBUG, logger="epd_receiver.adapters.integrations.sglang.bridge"):
        releaser.free_with_req(req)  # a second call
        releaser.free_with_req(Req("other", [1], bootstrap_room=1))  # same room, another request
        releaser.free_with_req(Req("unknown", [1], bootstrap_room=77))
    assert sum("nothing held" in r.message for r in caplog.records) == 3
    assert fork.bridge.arena.lent == 0 and delivered_mismatch(req, fork.source(req)) is None


def test_a_req_keeps_its_bytes_after_free_with_req_and_its_storage_is_reused_once_dropped() -> None:
    fork = Fork()
    first = fork.arrive(1, total=21, own_length=5)
    fork.iterate(4)
    kept = (first.input_embeds.clone(), first.multimodal_inputs.mrope_positions.clone())
    pointer = first.input_embeds.data_ptr()
    fork.scheduler.run_prefill()  # free_with_req(first); the Req still holds input_embeds and positions
    second = fork.arrive(2, total=19, own_length=5)
    fork.iterate(4)
    assert delivered_mismatch(second, fork.source(second)) is None
    assert torch.equal(first.input_embeds, kept[0]) and torch.equal(first.multimodal_inputs.mrope_positions, kept[1])
    assert second.input_embeds.data_ptr() != pointer and fork.bridge.arena.still_viewed == 1  # first's
    fork.scheduler.run_prefill()
    assert fork.bridge.arena.still_viewed == 2  # both given back, both still viewed by their Reqs

    first.input_embeds = first.multimodal_inputs = None  # the Req is done with its tensors
    third = fork.arrive(3, total=20, own_length=5)
    fork.iterate(4)
    assert third.input_embeds.data_ptr() == pointer and fork.bridge.arena.reused == 1  # now it is reused
    assert delivered_mismatch(third, fork.source(third)) is None
    fork.scheduler.run_prefill()
    fork.assert_clean()


def test_storage_is_reused_only_once_no_tensor_views_it() -> None:
    arena = PayloadArena(hidden_size=4)
    first = arena.take(10)
    pointer = first.embeddings.data_ptr()
    derived = first.embeddings[2:5].view(-1)  # what a caller may make of a payload tensor: another view
    assert arena.give_back(first) and not arena.give_back(first)
    del first
    assert arena.still_viewed == 1 and arena.take(6).embeddings.data_ptr() != pointer  # ``derived`` views it
    del derived
    assert arena.still_viewed == 0 and arena.take(6).embeddings.data_ptr() == pointer
    assert (arena.allocated, arena.reused) == (2, 1)


def test_use_counts_rise_with_a_view_and_fall_with_it() -> None:
    tensor = torch.empty(8)
    assert storage_unshared(tensor)
    view = tensor[1:]
    assert not storage_unshared(tensor) and not storage_unshared(view)
    del view
    assert storage_unshared(tensor)


def test_without_use_counts_given_back_storage_is_never_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(payload, "_SOLE_HOLDER", None)  # a torch that cannot tell
    arena = PayloadArena(hidden_size=4)
    arena.give_back(arena.take(4))
    assert arena.take(4) is not None and (arena.allocated, arena.reused) == (2, 0)


# ---- the link's evidence that the Encode side stopped -----------------------------------------------


class _Table:
    """A manager's table alone, for the evidence rules."""

    def __init__(self) -> None:
        self.network = Network()
        self.manager = LanguageManager(self.network, ([0] * 4, [0] * 4, [B * H * 2, B * 4, 3 * B * 4, 64]))
        ForkEncodeSide(f"{SLOW}:{PORT}", self.network, B, H)  # registered with its bootstrap server

    def receiver(self, room: int, address: str = f"{SLOW}:{PORT}") -> MooncakeEmbeddingReceiver:
        return MooncakeEmbeddingReceiver(self.manager, address, room)


def test_only_what_the_encode_side_reported_counts_as_evidence() -> None:
    t = _Table()
    m = t.manager
    cases = {
        "success": (1, lambda: m.on_status_message(1, KVPoll.Success), True),
        "remote failure": (2, lambda: m.on_status_message(2, KVPoll.Failed), True),
        "transferring": (3, lambda: m.on_status_message(3, KVPoll.Transferring), False),
        "heartbeat": (4, lambda: m.lose_connection(f"{SLOW}:{PORT}"), False),
        "nothing yet": (5, lambda: None, False),
    }
    for name, (room, event, expected) in cases.items():
        t.receiver(room)
        assert m.request_status[room] == KVPoll.WaitingForInput, name
        event()
        assert remote_evidence(m, room) is expected, name
    assert remote_evidence(m, 99) is False  # no entry at all
    t.network.unreachable.add(f"{BROKEN}:{PORT}")
    t.receiver(6, f"{BROKEN}:{PORT}")  # a failed bootstrap sets Failed on this side alone
    assert m.request_status[6] == KVPoll.Failed and remote_evidence(m, 6) is False


def test_the_links_own_abort_is_never_evidence_but_a_later_remote_status_is() -> None:
    t = _Table()
    receiver = t.receiver(1)
    link = ReceiverLink(receiver, room=1)
    link.abort()
    assert link.poll() == KVPoll.Failed and link.writes_stopped() is False  # poll() says Failed; we know better
    t.manager.lose_connection(f"{SLOW}:{PORT}")  # then a heartbeat Failed, and the abort record after it
    receiver.abort()
    assert link.writes_stopped() is False
    t.manager.on_status_message(1, KVPoll.Success)  # the Encode side finished its write after all
    assert link.writes_stopped() is True


def test_evidence_is_latched_before_failure_exception_pops_it() -> None:
    t = _Table()
    link = ReceiverLink(t.receiver(1), room=1)
    t.manager.on_status_message(1, KVPoll.Failed)
    assert link.poll() == KVPoll.Failed
    assert "Failed to get embedding data" in (link.failure_reason() or "")
    assert 1 not in t.manager.request_status  # popped by failure_exception()
    assert link.writes_stopped() is True


def test_a_warm_up_link_has_stopped_from_the_start_and_a_plain_receiver_never_has() -> None:
    assert ReceiverLink(FakeKVReceiver(None, "x"), room=1, writes_nothing=True).writes_stopped() is True
    assert ReceiverLink(FakeKVReceiver(None, "x"), room=1).writes_stopped() is False


# ---- the scheduler loop with late writes: abort, deadline, failures, success, release ---------------


class PollTrustingLink(ReceiverLink):
    """The old reading, kept to show what the loop test catches: a terminal poll() taken as evidence,
    though the fork's receiver reports Failed after its own abort (or a lost heartbeat)."""

    def writes_stopped(self) -> bool:
        return int(self.receiver.poll()) in (KVPoll.Failed, KVPoll.Success)


TRANSFER_TIMEOUT, DRAIN = 5.0, 20.0


@dataclass
class Story:
    """One run of the loop test: what was delivered wrong, fences lifted without cause, who was answered."""

    fork: Fork
    corrupted: dict[str, str] = field(default_factory=dict)
    premature_lifts: list[int] = field(default_factory=list)
    lifted_by: dict[int, str] = field(default_factory=dict)
    fenced_at: dict[int, float] = field(default_factory=dict)
    failed_at_turn: dict[int, int] = field(default_factory=dict)
    late_writes: list[tuple[int, int]] = field(default_factory=list)
    turn: int = 0

    def iterate(self, times: int = 1) -> None:
        """The prompt Encode side writes first; the slow side writes a failed room's queued chunk in the
        turn after the room was answered, after every prompt write of that turn (so it lands last)."""
        for _ in range(times):
            self.turn += 1
            self.fork.encode[FAST].run()
            slow = self.fork.encode[SLOW]
            for room in slow.pending():
                if self.turn > self.failed_at_turn.get(room, 1 << 30):
                    before = len(slow.writes)
                    slow.transfer(room)
                    self.late_writes += slow.writes[before:]
            fences = dict(self.fork.bridge.allocator.fences())
            streamed = len(self.fork.scheduler.streamed)
            self.fork.scheduler.process_multimodal_language_queue()
            for req in self.fork.scheduler.streamed[streamed:]:
                self.failed_at_turn[req.bootstrap_room] = self.turn
            self._judge(fences)
            self._prefill()

    def _judge(self, before: dict[int, tuple[int, ...]]) -> None:
        now = self.fork.clock.now()
        after = self.fork.bridge.allocator.fences()
        for room in after:
            self.fenced_at.setdefault(room, now)
        for room in set(before) - set(after):
            if self.fork.manager.remote_terminal(room):
                self.lifted_by[room] = "remote status"
            elif now - self.fenced_at.get(room, now) >= DRAIN:
                self.lifted_by[room] = "drain deadline"
            else:
                self.premature_lifts.append(room)

    def _prefill(self) -> None:
        for req in self.fork.scheduler.waiting_queue:
            problem = delivered_mismatch(req, self.fork.source(req)) if req.input_embeds is not None else None
            if problem is not None:
                self.corrupted[req.rid] = problem
        self.fork.scheduler.run_prefill()

    def until(self, done: Callable[[], bool], limit: int = 12) -> None:
        for _ in range(limit):
            if done():
                return
            self.iterate()
        raise AssertionError("the loop did not get there")


def run_story(link_factory: Callable[..., Any]) -> tuple[Story, dict[str, Req]]:
    """A pool of one A0 (two blocks), so that every lifted block goes straight to the next request.

    abort: A is aborted through the scheduler while its chunk is queued on the slow side;
    deadline: B's Encode side is silent past the transfer deadline;
    sender failure: C's Encode side (an instance of its own: from then on it fails the session's every
    chunk) reports Failed;
    heartbeat: the manager loses the slow side's heartbeat while D transfers (Failed on this side only);
    drain: E is aborted, its late chunk is partial (Transferring, not terminal), so only the drain
    deadline ends its fence;
    after each, a prompt request takes the blocks; the last one (R) resumes and completes.
    """
    fork = Fork(num_blocks=2, link_factory=link_factory, transfer_timeout_s=TRANSFER_TIMEOUT, drain_timeout_s=DRAIN)
    story = Story(fork)
    s, reqs = fork.scheduler, {}

    def transferring(room: int) -> Callable[[], bool]:
        return lambda: fork.bridge.queue.get(room) is not None and bool(fork.bridge.queue.get(room).blocks)  # type: ignore[union-attr]

    def answered(req: Req) -> Callable[[], bool]:
        return lambda: req in s.streamed or req.input_embeds is not None

    reqs["A"] = fork.arrive(10, total=8, own_length=2, host=SLOW)
    story.until(transferring(10))
    s.abort_request("r10")
    reqs["a"] = fork.arrive(11, total=8, own_length=3)
    story.until(answered(reqs["a"]))

    reqs["B"] = fork.arrive(20, total=8, own_length=2, host=SLOW)
    story.until(transferring(20))
    fork.clock.advance(TRANSFER_TIMEOUT + 1)
    reqs["b"] = fork.arrive(21, total=7, own_length=7)
    story.until(answered(reqs["b"]))

    reqs["C"] = fork.arrive(30, total=8, own_length=2, host=BROKEN)
    story.until(transferring(30))
    fork.encode[BROKEN].fail(30)
    reqs["c"] = fork.arrive(31, total=6, own_length=1)
    story.until(answered(reqs["c"]))

    reqs["D"] = fork.arrive(40, total=8, own_length=2, host=SLOW)
    story.until(transferring(40))
    fork.manager.lose_connection(f"{SLOW}:{PORT}")
    reqs["d"] = fork.arrive(41, total=8, own_length=8)
    story.until(answered(reqs["d"]))

    reqs["E"] = fork.arrive(50, total=12, own_length=2, host=SLOW)
    story.until(transferring(50))
    s.abort_request("r50")
    reqs["e"] = fork.arrive(51, total=8, own_length=4)
    story.iterate(4)
    fork.clock.advance(DRAIN + 1)
    story.until(answered(reqs["e"]))

    reqs["R"] = fork.arrive(60, total=13, own_length=3)  # A0, then a resume of one block
    story.until(answered(reqs["R"]))
    story.iterate(2)
    return story, reqs


def test_the_fork_loop_fences_every_late_write_and_lifts_only_on_the_encode_sides_word_or_the_drain() -> None:
    story, reqs = run_story(ReceiverLink)
    fork = story.fork
    assert story.corrupted == {} and story.premature_lifts == []
    for name in "abcdeR":
        assert reqs[name] not in fork.scheduler.streamed, name  # every prompt request was delivered, intact
    answers = {name: aborted_with_500(reqs[name]) for name in "ABCDE"}
    assert "aborted" in answers["A"] and "aborted" in answers["E"]
    assert "TRANSFERRING for more than" in answers["B"]
    assert "Failed to get embedding data" in answers["C"] and "Losing connection" in answers["D"]
    # every fenced block took a late write, and each fence ended for a reason the Encode side gave
    late_rooms = {room for room, _ in story.late_writes}
    assert late_rooms == {10, 20, 40, 50}
    assert story.lifted_by == {10: "remote status", 20: "remote status", 40: "remote status", 50: "drain deadline"}
    assert 30 not in story.fenced_at  # a sender that reported Failed fences nothing
    fork.assert_clean()


def test_retired_rooms_leave_the_forks_tables_as_its_own_queue_leaves_them() -> None:
    """After aborts, a timeout, sender and heartbeat failures and a drain, every failed room is gone from
    the fork's manager (status and failure record), as the fork's queue pops them through
    ``failure_exception()``; the bridge does it once the room is retired, so late statuses that arrived
    while it was fenced are gone too. What stays is what the fork also leaves: the Success entry of
    every delivered room, which its queue never clears."""
    story, reqs = run_story(ReceiverLink)
    manager = story.fork.manager
    delivered = {reqs[name].bootstrap_room for name in "abcdeR"}
    assert manager.request_status == dict.fromkeys(delivered, KVPoll.Success)
    assert manager.failure_records == {}
    story.fork.assert_clean()


def test_the_same_loop_catches_a_link_that_takes_its_own_failed_as_the_senders_word() -> None:
    story, reqs = run_story(PollTrustingLink)
    assert set(story.premature_lifts) >= {10, 50}  # lifted at once after the local abort
    # the late writes of A (aborted) and D (heartbeat lost, so never fenced) land in a and d's payloads
    assert set(story.corrupted) >= {"r11", "r41"}
    assert reqs["e"] in story.fork.scheduler.streamed  # E's late aux row made e's own transfer look impossible


# ---- tensor-parallel ranks over the scheduler's gloo group ------------------------------------------


def two_rank_job(context: RankContext, late_on_this_rank_first: bool) -> dict[str, Any]:
    """Both ranks run the same loop over their own pool; the aborted room's Encode side answers one rank
    before the other. The same iteration count on both ranks: every iteration is a collective."""
    fork = Fork(num_blocks=2, group=dist.group.WORLD)
    aborted = fork.arrive(10, total=8, own_length=2, host=SLOW)
    fork.iterate(2, deliver=False)
    fork.scheduler.abort_request("r10")  # an AbortReq reaches every rank
    fork.iterate(1, deliver=False)
    if late_on_this_rank_first:
        fork.encode[SLOW].run()  # a late write into this rank's fence, then Success to this rank only
    fork.iterate(2, deliver=False)
    fenced_while_one_rank_waits = fork.bridge.allocator.fenced_count
    if not late_on_this_rank_first:
        fork.encode[SLOW].run()
    fork.iterate(1, deliver=False)
    fenced_after = fork.bridge.allocator.fenced_count
    prompt = fork.arrive(11, total=12, own_length=3)  # A0, then a resume into one block
    fork.iterate(5)
    return {
        "ranks": fork.bridge.queue.rank_count,
        "gloo": isinstance(fork.bridge.queue._ranks, GlooRankGroup),
        "aborted": aborted in fork.scheduler.streamed,
        "fenced": (fenced_while_one_rank_waits, fenced_after),
        "delivered": prompt in fork.scheduler.waiting_queue and delivered_mismatch(prompt, fork.source(prompt)) is None,
    }


def test_two_ranks_reduce_over_the_schedulers_gloo_group_and_lift_a_fence_only_when_both_senders_stopped() -> None:
    with RankProcesses(2) as ranks:
        answers = ranks.run_each(two_rank_job, [(True,), (False,)], timeout_s=120)
    expected = {"ranks": 2, "gloo": True, "aborted": True, "fenced": (2, 0), "delivered": True}
    assert answers == [expected, expected]
