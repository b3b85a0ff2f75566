"""The SGLang bridge installed in a scheduler of the fork's shape, and what the fork's loop delivers through it.

SGLang's statuses and buffer layout, the one pool and the attributes ``install`` leaves in place, and the
fork's loop delivering text, multimodal, resumed and warm-up requests intact, with entries of the fork's
shape, deepstack joined, and a full pool holding requests back. The harness is ``sglang_bridge_bench.py``.
"""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry
from support.sglang_bridge_bench import FAST, SLOW, B, D, Fork, H, K, N, delivered_mismatch
from support.sglang_fork_receiver import MooncakeEmbeddingReceiver
from support.sglang_fork_scheduler import LanguageScheduler, Modality, MultimodalInputs, prepare_abort

from epd_receiver.adapters.integrations.sglang.bridge import PromptKind, classify
from epd_receiver.adapters.integrations.sglang.install import install
from epd_receiver.adapters.integrations.sglang.mm import MultimodalInputsLike
from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.prometheus import PrometheusMetrics
from epd_receiver.fsm import KVPoll

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


# ---- metrics in the host's registry -----------------------------------------------------------------


def test_the_receivers_metrics_land_in_the_registry_the_host_passes() -> None:
    registry = CollectorRegistry()  # the scheduler's (prometheus_client.REGISTRY in a real deployment)
    fork = Fork(metrics=PrometheusMetrics(prefix="sglang:", registry=registry))

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(f"sglang:epd_receive_{name}", labels)

    delivered = fork.arrive(1, total=6, own_length=6)
    aborted = fork.arrive(2, total=8, own_length=2, host=SLOW)
    fork.iterate(2, deliver=False)
    fork.scheduler.abort_request("r2")
    fork.iterate(1, deliver=False)
    assert sample("requests_total", outcome="failed") == 1 and sample("failed_reqs_total", cause="Aborted") == 1
    assert sample("pool_blocks", standing="fenced") == 2 == sample("fenced_blocks_total")  # its sender may write
    fork.iterate(6)

    assert fork.scheduler.streamed == [aborted] and fork.scheduler.waiting_queue == [delivered]
    assert sample("requests_total", outcome="success") == 1 and sample("requests_total", outcome="failed") == 1
    assert sample("stage_seconds_count", stage="receive") == 2 and sample("tokens_total") == 6
    assert sample("fence_seconds_count") == 1 and sample("pool_blocks", standing="fenced") == 0
    assert sample("requests_in_state", state="success") == 0  # handed over to prefill, no longer counted
