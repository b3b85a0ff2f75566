"""The SGLang bridge: SGLang's queues and receiver interface over the controller, driven as SGLang drives them.

The Encode side here is written against the *original* layout only: it learns where to write from
``get_buf_infos()`` (pointers, lengths, row lengths) and moves raw bytes between rows by pointer
arithmetic, aux row only with the first chunk's first block, ``n/B`` of every other row, as the Mooncake
sender does. If our pool's layout drifted from SGLang's, its payloads would come out wrong here. The
scheduler is the README's own ``LanguageScheduler``, so the documented wiring is what is tested.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from epd_receiver.adapters.buffers import TorchBlockBuffers
from epd_receiver.adapters.sglang import (
    FAKE_BOOTSTRAP_HOST,
    BridgeConfig,
    EmbeddingBridge,
    KVPoll,
    MultimodalPositions,
    PromptKind,
    ReceiverLink,
    classify,
)
from epd_receiver.fsm import Aborted, SenderFailed, SizeMismatch

README = Path(__file__).parent.parent / "README.md"
AUX_INDEX = 3  # aux is the fourth buffer of get_buf_infos()
B, H, K, N, D = 4, 8, 2, 16, 8  # block size, hidden size, deepstack layers, pool blocks, default tokens


# ---- the Encode side, written for the original buffers ---------------------------------------------


@dataclass
class Source:
    """One request as the encoder produced it."""

    embeddings: torch.Tensor  # (T, H)
    fill_ids: torch.Tensor  # (T,)
    mrope: torch.Tensor  # (3, T)
    deepstack: torch.Tensor | None  # (T, H*K)
    delta: int

    @property
    def total(self) -> int:
        return int(self.fill_ids.shape[0])


@dataclass
class EncodeRoom:
    source: Source
    src_blocks: list[int]
    status: KVPoll = KVPoll.WaitingForInput
    dst_blocks: list[int] = field(default_factory=list)
    sent_tokens: int = 0
    allocated_tokens: int = 0
    pending: bool = False
    failure: str | None = None


class PointerSender:
    """Writes into the receiver's pool knowing only its ``get_buf_infos()``, like the Mooncake sender."""

    def __init__(self, deepstack_layers: int, num_blocks: int = 64) -> None:
        self.pool = TorchBlockBuffers(num_blocks, B, H, deepstack_layers)  # the Encode side's own pool
        self.deepstack_layers = deepstack_layers
        self.rooms: dict[int, EncodeRoom] = {}
        self.next_block = 0
        self.dst: tuple[list[int], list[int], list[int]] | None = None

    def register(self, buf_infos: tuple[list[int], list[int], list[int]]) -> None:
        self.dst = buf_infos

    def encode(self, room: int, total: int, seed: int) -> Source:
        """Run the "encoder" and set_buf its output into this side's own rows (aux in the first block)."""
        g = torch.Generator().manual_seed(seed)
        deepstack = torch.randn(total, H * self.deepstack_layers, generator=g).bfloat16()
        source = Source(
            embeddings=torch.randn(total, H, generator=g).bfloat16(),
            fill_ids=torch.randint(0, 1 << 16, (total,), generator=g, dtype=torch.int32),
            mrope=torch.randint(0, 1 << 16, (3, total), generator=g, dtype=torch.int32),
            deepstack=deepstack if self.deepstack_layers else None,
            delta=-7 * room,
        )
        blocks = list(range(self.next_block, self.next_block + -(-total // B)))
        self.next_block += len(blocks)
        for i, block in enumerate(blocks):
            lo, hi = i * B, min((i + 1) * B, total)
            ds = source.deepstack[lo:hi] if source.deepstack is not None else None
            self.pool.write_block(block, source.embeddings[lo:hi], source.fill_ids[lo:hi], source.mrope[:, lo:hi], ds)
        self.pool.write_aux(blocks[0], total, source.delta)
        self.rooms[room] = EncodeRoom(source, blocks)
        return source

    def on_init(self, room: int, blocks: list[int], allocated_tokens: int) -> None:
        state = self.rooms[room]
        state.dst_blocks, state.allocated_tokens, state.pending = blocks, allocated_tokens, True

    def on_resume(self, room: int, blocks: list[int], sent_tokens: int, allocated_tokens: int) -> None:
        state = self.rooms[room]
        state.dst_blocks, state.sent_tokens, state.allocated_tokens = blocks, sent_tokens, allocated_tokens
        state.pending = True

    def fail(self, room: int, reason: str) -> None:
        self.rooms[room].status, self.rooms[room].failure = KVPoll.Failed, reason

    def progress(self) -> None:
        """Every pending chunk lands, then its status is published."""
        for state in self.rooms.values():
            if state.pending and state.status is not KVPoll.Failed:
                self._transfer(state)

    def _transfer(self, state: EncodeRoom) -> None:
        assert self.dst is not None, "the receiver registers its buffers first"
        dst_ptrs, _, item_lens = self.dst
        src_ptrs, _, src_item_lens = self.pool.get_buf_infos()
        assert item_lens == src_item_lens, "both sides must agree on B, H and K"
        b = item_lens[1] // 4  # how the original derives the block size
        assert state.allocated_tokens == len(state.dst_blocks) * b
        remaining = state.source.total - state.sent_tokens
        tokens = min(remaining, state.allocated_tokens)
        start = state.sent_tokens // b
        pairs = zip(state.src_blocks[start:], state.dst_blocks[: -(-tokens // b)], strict=False)
        for i, (src, dst) in enumerate(pairs):
            n = min(b, tokens - i * b)
            for j, (dst_ptr, src_ptr, item) in enumerate(zip(dst_ptrs, src_ptrs, item_lens, strict=True)):
                if j == AUX_INDEX:
                    if state.sent_tokens == 0 and i == 0:
                        ctypes.memmove(dst_ptr + dst * item, src_ptr + src * item, item)
                    continue
                ctypes.memmove(dst_ptr + dst * item, src_ptr + src * item, item * n // b)
        state.sent_tokens += tokens
        state.pending = False
        state.status = KVPoll.Transferring if tokens < remaining else KVPoll.Success


class StandInReceiver:
    """SGLang's receiver interface, talking to the in-process Encode side."""

    def __init__(self, sender: PointerSender, room: int) -> None:
        self.sender, self.room = sender, room
        self.aborted = False

    def poll(self) -> KVPoll:
        # As SGLang's: after abort() the receiver concludes Failed locally.
        return KVPoll.Failed if self.aborted else self.sender.rooms[self.room].status

    def init(self, embedding_indices: list[int] | None = None, allocated_tokens: int | None = None) -> None:
        assert embedding_indices is not None and allocated_tokens is not None
        self.sender.on_init(self.room, embedding_indices, allocated_tokens)

    def resume_transfer(self, embedding_indices: list[int], sent_tokens: int, allocated_tokens: int) -> None:
        self.sender.on_resume(self.room, embedding_indices, sent_tokens, allocated_tokens)

    def failure_exception(self) -> BaseException:
        raise RuntimeError(f"embedding transfer failed: {self.sender.rooms[self.room].failure}")

    def abort(self) -> None:
        self.aborted = True


class FakeReceiver:
    """A warm-up request's receiver: ready at once, Success after init, never writes."""

    def __init__(self) -> None:
        self.inited = False

    def poll(self) -> KVPoll:
        return KVPoll.Success if self.inited else KVPoll.WaitingForInput

    def init(self, embedding_indices: list[int] | None = None, allocated_tokens: int | None = None) -> None:
        self.inited = True

    def resume_transfer(self, embedding_indices: list[int], sent_tokens: int, allocated_tokens: int) -> None:
        raise AssertionError("a warm-up request never resumes")

    def failure_exception(self) -> BaseException | None:
        return None

    def abort(self) -> None:
        pass


@dataclass(eq=False)
class Req:
    """The fields of SGLang's ``Req`` the Language side's queues touch."""

    rid: str
    bootstrap_room: int
    origin_input_ids: list[int]
    bootstrap_host: str = "10.0.0.1"
    input_embeds: Any = None
    multimodal_inputs: Any = None


# ---- the scheduler: the README's own class ----------------------------------------------------------


def readme_scheduler_class() -> type:
    """The ``py`` block of the README's SGLang section, executed as it is written there."""
    blocks = re.findall(r"```py\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    assert len(blocks) == 1, "the README has one SGLang wiring example"
    namespace: dict[str, Any] = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    return namespace["LanguageScheduler"]  # type: ignore[no-any-return]


class Harness:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, deepstack_layers: int = 0, num_blocks: int = N) -> None:
        monkeypatch.setenv("SGLANG_EMBEDDING_CACHE_BUFFER_SIZE", str(num_blocks))
        monkeypatch.setenv("SGLANG_EMBEDDING_CACHE_BLOCK_SIZE", str(B))
        monkeypatch.setenv("SGLANG_EMBEDDING_DEFAULT_ALLOCATE_BUFFER_SIZE", str(D))
        self.sender = PointerSender(deepstack_layers)
        self.receivers: dict[int, StandInReceiver] = {}
        scheduler_class = readme_scheduler_class()
        if deepstack_layers:  # the README builds the pool without deepstack; this model has some

            class WithDeepstack(scheduler_class):  # type: ignore[misc, valid-type]
                def __init__(self, make_receiver: Any, hidden_size: int) -> None:
                    super().__init__(make_receiver, hidden_size)
                    config = BridgeConfig.from_env(hidden_size, deepstack_layers)
                    self.bridge = EmbeddingBridge(config, make_receiver)

            scheduler_class = WithDeepstack
        self.scheduler = scheduler_class(self.make_receiver, H)
        self.bridge: EmbeddingBridge = self.scheduler.bridge
        self.sender.register(self.bridge.get_buf_infos())
        self.sources: dict[int, Source] = {}

    def make_receiver(self, req: Req) -> Any:
        if req.bootstrap_host == FAKE_BOOTSTRAP_HOST:
            return FakeReceiver()
        receiver = StandInReceiver(self.sender, req.bootstrap_room)
        self.receivers[req.bootstrap_room] = receiver
        return receiver

    def arrive(self, room: int, total: int, own_length: int) -> Req:
        self.sources[room] = self.sender.encode(room, total, seed=room)
        req = Req(f"r{room}", room, list(range(own_length)))
        self.scheduler.process_input_requests([req])
        return req

    def warmup(self, room: int) -> Req:
        req = Req(f"w{room}", room, [0], bootstrap_host=FAKE_BOOTSTRAP_HOST)
        self.scheduler.process_input_requests([req])
        return req

    def run(self, iterations: int = 12) -> None:
        for _ in range(iterations):
            self.sender.progress()  # the Encode side makes progress between scheduler iterations
            self.scheduler.process_multimodal_language_queue()


def assert_delivered(req: Req, source: Source) -> None:
    expected = source.embeddings if source.deepstack is None else torch.cat([source.embeddings, source.deepstack], -1)
    assert torch.equal(req.input_embeds, expected)
    assert req.origin_input_ids == source.fill_ids.tolist()


# ---- the tests --------------------------------------------------------------------------------------


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


def test_a_scheduler_loop_receives_text_multimodal_and_resumed_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch)
    text = h.arrive(1, total=6, own_length=6)  # fits A0, nothing expanded
    image = h.arrive(2, total=7, own_length=3)  # fits A0, placeholders expanded
    long = h.arrive(3, total=21, own_length=5)  # T > D: the first chunk, then a resume of 13 tokens
    h.run()

    assert set(map(id, h.scheduler.waiting_queue)) == {id(text), id(image), id(long)}
    assert h.scheduler.aborted == []
    for req in (text, image, long):
        assert_delivered(req, h.sources[req.bootstrap_room])
    assert text.multimodal_inputs is None  # same length on both sides: a text-only prompt
    for req in (image, long):
        mm = req.multimodal_inputs
        assert isinstance(mm, MultimodalPositions)
        assert torch.equal(mm.mrope_positions, h.sources[req.bootstrap_room].mrope)
        assert mm.mrope_position_delta.tolist() == [[h.sources[req.bootstrap_room].delta]]
    assert h.bridge.queue.get(3) is None and h.bridge.allocator.free_count == N  # blocks back at assembly
    assert len(h.bridge.prealloc_queue) == 0 and len(h.bridge.transfer_queue) == 0


def test_the_payload_memory_is_reused_once_prefill_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch)
    first = h.arrive(1, total=21, own_length=5)
    h.run()
    arena = h.bridge.buffers.arena
    assert arena is not None and arena.lent == 1
    h.scheduler.free_after_prefill(first)
    assert arena.lent == 0
    second = h.arrive(2, total=19, own_length=5)
    h.run()
    assert arena.reused == 1 and arena.allocated == 1  # the second payload lives in the first one's memory
    assert_delivered(second, h.sources[2])


def test_deepstack_is_joined_to_the_embeddings_on_the_last_dimension(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch, deepstack_layers=K)
    req = h.arrive(1, total=13, own_length=2)
    h.run()
    assert req.input_embeds.shape == (13, H * (1 + K))
    assert_delivered(req, h.sources[1])


def test_a_prompt_longer_than_its_expansion_fails_and_frees_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch)
    req = h.arrive(1, total=5, own_length=9)
    h.run()
    assert h.scheduler.waiting_queue == []
    ((failed, error),) = h.scheduler.aborted
    assert failed is req and isinstance(error, SizeMismatch)
    assert h.bridge.allocator.free_count == N
    arena = h.bridge.buffers.arena
    assert arena is not None and arena.lent == 0


def test_sender_failure_and_client_abort_come_out_of_pop_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch)
    broken = h.arrive(1, total=21, own_length=5)
    gone = h.arrive(2, total=21, own_length=5)
    h.run(1)  # both get A0 and their init
    h.sender.fail(1, "peer reset")
    h.bridge.abort(gone)
    h.run()
    failures = {id(req): error for req, error in h.scheduler.aborted}
    assert isinstance(failures[id(broken)], SenderFailed) and "peer reset" in str(failures[id(broken)])
    assert isinstance(failures[id(gone)], Aborted) and h.receivers[2].aborted
    assert h.scheduler.waiting_queue == [] and h.bridge.allocator.free_count == N


def test_a_warm_up_request_passes_through_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch)
    req = h.warmup(9)
    h.run(3)
    assert h.scheduler.waiting_queue == [req]
    assert req.input_embeds is None and req.origin_input_ids == [0]
    assert h.bridge.allocator.free_count == N


def test_a_full_pool_holds_later_requests_in_the_prealloc_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch, num_blocks=2)  # room for exactly one A0
    first = h.arrive(1, total=8, own_length=1)
    second = h.arrive(2, total=8, own_length=1)
    h.scheduler.process_multimodal_language_queue()  # first gets A0, second waits for the pool
    h.scheduler.process_multimodal_language_queue()
    assert len(h.bridge.prealloc_queue) == 1 and len(h.bridge.transfer_queue) == 1
    h.run()
    assert h.scheduler.waiting_queue == [first, second]


def test_the_link_passes_sglangs_keyword_arguments_and_reads_a_raised_failure() -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    class Recorder:
        def poll(self) -> KVPoll:
            return KVPoll.Transferring

        def init(self, embedding_indices: list[int] | None = None, allocated_tokens: int | None = None) -> None:
            calls.append(("init", {"embedding_indices": embedding_indices, "allocated_tokens": allocated_tokens}))

        def resume_transfer(self, embedding_indices: list[int], sent_tokens: int, allocated_tokens: int) -> None:
            calls.append(("resume", {"embedding_indices": embedding_indices, "sent": sent_tokens}))

        def failure_exception(self) -> BaseException:
            raise ValueError("block size mismatch")

        def abort(self) -> None:
            calls.append(("abort", {}))

    link = ReceiverLink(Recorder())
    link.init((4, 2), 8)
    link.resume((7,), 8, 4)
    link.abort()
    assert link.poll() == 3 and type(link.poll()) is int
    assert link.failure_reason() == "block size mismatch"
    assert calls == [
        ("init", {"embedding_indices": [4, 2], "allocated_tokens": 8}),
        ("resume", {"embedding_indices": [7], "sent": 8}),
        ("abort", {}),
    ]
