"""Payload memory under the SGLang bridge: ``free_with_req`` gives a payload back once, and no storage is reused
while a tensor, a Req's or another view, still points into it. The harness is ``sglang_bridge_bench.py``.
"""

from __future__ import annotations

import logging

import pytest
import torch
from support.sglang_bridge_bench import Fork, delivered_mismatch
from support.sglang_fork_scheduler import Req

from epd_receiver.adapters.ports import payload
from epd_receiver.adapters.ports.payload import PayloadArena, storage_unshared

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
