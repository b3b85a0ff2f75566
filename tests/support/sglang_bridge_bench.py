"""The SGLang bridge installed in a scheduler of the fork's exact shape, driven as the fork drives it: the
harness of every ``test_sglang_*.py``.

The scheduler, the Mooncake receiver and its manager, the warm-up receiver, the Encode side and the
prefill are fakes of the fork's code (``sglang_fork_scheduler.py``, ``sglang_fork_receiver.py``,
``sglang_fork_encode.py``, each citing the lines it reproduces). The Encode side learns where to write only
from the pool's registered ``get_buf_infos()`` and moves raw bytes by pointer, as the Mooncake sender does,
and it never hears of a Language-side abort, as in the fork.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from epd_receiver.adapters.integrations.sglang.bridge import FAKE_BOOTSTRAP_HOST, EmbeddingBridge, LanguageEntry
from epd_receiver.adapters.integrations.sglang.install import install, receiver_factory
from epd_receiver.adapters.integrations.sglang.link import ReceiverLink
from epd_receiver.adapters.integrations.sglang.mm import sglang_multimodal_inputs
from epd_receiver.adapters.ports.clock import ManualClock
from epd_receiver.fsm import ReceiverConfig, ReceiverMetrics
from support.sglang_fork_encode import EncodeSide as ForkEncodeSide
from support.sglang_fork_encode import Source
from support.sglang_fork_receiver import FakeKVReceiver, LanguageManager, MooncakeEmbeddingReceiver, Network
from support.sglang_fork_scheduler import (
    FinishAbort,
    LanguageScheduler,
    Modality,
    MultimodalDataItem,
    MultimodalInputs,
    Req,
    prepare_abort,
)

B, H, K, N, D = 4, 8, 2, 16, 8  # block size, hidden size, deepstack layers, pool blocks, default tokens
PORT = 8998
SLOW, FAST = "10.0.0.1", "10.0.0.2"  # two Encode instances: one whose writes come late, one prompt
BROKEN = "10.0.0.3"  # a third, whose write is refused in the loop test (which poisons its session there)
FORK_MM = sglang_multimodal_inputs(MultimodalInputs, MultimodalDataItem, Modality.IMAGE)
TRANSFER_TIMEOUT, DRAIN = 5.0, 20.0  # the bridge's deadlines where a test sets them


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
        metrics: ReceiverMetrics | None = None,
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
            metrics=metrics,
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
