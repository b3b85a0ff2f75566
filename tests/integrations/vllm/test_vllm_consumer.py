"""The consumer end to end on vLLM's own objects: factory, Request, SchedulerOutput, the EC mixin, the aggregator.

The Encode side is the in-process sender (``support/vllm_links.py``), stepped once before each engine step, as
a producer makes progress between two steps. Every loaded tensor is compared bit for bit with what it encoded.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("vllm.v1.request", reason="vLLM is not installed (make installs it)")

import torch
from support.vllm_engine import Engine, request, vllm_config
from support.vllm_links import FACTORY, ROOMS, SIZES, UNREACHABLE, sender_for
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorRole

from epd_receiver.adapters.integrations.vllm.connector import EPDReceiverConnector
from epd_receiver.adapters.ports.sender import InProcessSender

B, H, BLOCKS = 16, 32, 8  # a pool of 128 tokens


def extra(**more: Any) -> dict[str, Any]:
    return {"hidden_size": H, "num_blocks": BLOCKS, "block_size": B, "link_factory": FACTORY, **more}


def engine(workers: int = 1, **more: Any) -> Engine:
    return Engine(vllm_config(extra(**more), workers=workers))


def sender(eng: Engine) -> InProcessSender:
    assert isinstance(eng.scheduler, EPDReceiverConnector) and eng.scheduler.receiver is not None
    return sender_for(eng.scheduler.receiver.buffers)


def produce(eng: Engine) -> None:
    """The producer makes progress: every room's pending chunk lands, then it acts on the aborts it was sent."""
    s = sender(eng)
    for room in s.rooms():
        s.deliver(room)
        s.act_on_abort(room)


def run(eng: Engine, steps: int = 200) -> None:
    for _ in range(steps):
        if not eng.pending():
            return
        produce(eng)
        eng.step()
    raise AssertionError("the engine did not settle")


def encoded(eng: Engine, mm_hash: str) -> torch.Tensor:
    """What the producer encoded for the item: its source rows (``source.py``), token by token."""
    source = sender(eng).source(ROOMS[mm_hash])
    return source.bank.embeddings[source.fill_ids.long() % source.bank.rows]


def assert_loaded(eng: Engine, mm_hash: str) -> None:
    for cache in eng.caches:
        assert torch.equal(cache[mm_hash], encoded(eng, mm_hash)), mm_hash


def test_vllms_factory_builds_our_connector_for_each_role() -> None:
    eng = engine()
    assert isinstance(eng.scheduler, EPDReceiverConnector) and eng.scheduler.role is ECConnectorRole.SCHEDULER
    assert eng.scheduler.receiver is not None and eng.scheduler.is_consumer
    (worker,) = eng.workers
    assert isinstance(worker, EPDReceiverConnector) and worker.role is ECConnectorRole.WORKER
    assert worker.loader is not None and worker.receiver is None


def test_an_item_that_fits_is_loaded_into_the_encoder_cache_bit_for_bit() -> None:
    eng = engine()
    eng.add(request("r1", [("fits", 40)]))
    eng.step()  # ensure_cache_available starts it: the request waits
    assert "r1" not in eng.finished and not eng.caches[0]
    run(eng)
    assert eng.finished == {"r1": "prefilled"} and not eng.encoded_locally
    assert_loaded(eng, "fits")
    assert eng.caches[0]["fits"].shape == (40, H)


def test_an_item_ten_times_the_pool_arrives_in_rounds() -> None:
    eng = engine()
    eng.add(request("big", [("ten-pools", 10 * B * BLOCKS)]))
    run(eng)
    assert eng.finished == {"big": "prefilled"}
    assert_loaded(eng, "ten-pools")
    resumes = [m for m in sender(eng).room_messages(ROOMS["ten-pools"]) if m.kind == "resume"]
    assert len(resumes) >= 9  # the pool holds a tenth of it: at least ten rounds
    receiver = eng.scheduler.receiver  # type: ignore[attr-defined]
    assert receiver.allocator.free_count == BLOCKS and not eng.scheduler.has_pending_push_work()


def test_several_items_per_request_and_an_item_two_requests_share() -> None:
    eng = engine()
    eng.add(request("a", [("x", 30), ("y", 150), ("z", 7)]))
    eng.add(request("b", [("y", 150), ("w", 20)]))
    run(eng)
    assert eng.finished == {"a": "prefilled", "b": "prefilled"} and not eng.encoded_locally
    for mm_hash in ("x", "y", "z", "w"):
        assert_loaded(eng, mm_hash)
    assert len(sender(eng).rooms()) == 4  # the shared item was fetched once


def test_an_abort_mid_transfer_keeps_its_blocks_fenced_through_a_late_write() -> None:
    eng = engine()
    eng.add(request("gone", [("aborted", 100)]))
    eng.step()  # started
    s = sender(eng)
    room = ROOMS["aborted"]
    for _ in range(6):
        chunk = s.pending(room)
        if chunk is not None and chunk.sent_tokens > 0:
            break  # the remainder is asked for in a resume of several blocks
        s.deliver(room)  # the first chunk (A0, one block) lands
        eng.step()
    assert chunk is not None and chunk.sent_tokens > 0 and len(chunk.blocks) > 1
    s.deliver(room, blocks=1)  # the resume's write is under way when the client aborts
    eng.abort("gone")
    eng.step()  # the item fails Aborted: its blocks stay fenced while the producer may write
    receiver = eng.scheduler.receiver  # type: ignore[attr-defined]
    assert receiver.queue.fenced_rooms == (room,) and eng.scheduler.has_pending_push_work()
    eng.add(request("next", [("after", 100)]))
    for _ in range(4):
        eng.step()
    taken = {b for m in s.room_messages(ROOMS["after"]) for b in m.blocks}
    assert taken and not taken & set(chunk.blocks)  # never granted a block the aborted item may write
    before = len(s.writes)
    s.deliver(room)  # the late write lands, in the fenced blocks only
    late = {block for r, block in s.writes[before:] if r == room}
    assert late and late <= set(chunk.blocks)
    s.act_on_abort(room)  # the producer stops and says so: the fence lifts
    run(eng)
    assert eng.finished == {"gone": "aborted", "next": "prefilled"}
    assert "aborted" not in eng.caches[0]
    assert_loaded(eng, "after")
    assert receiver.queue.fenced_rooms == () and receiver.allocator.free_count == BLOCKS


def test_a_dead_producer_fails_the_request_and_fences_until_the_drain_deadline() -> None:
    eng = engine(clock="epd_receiver.adapters.ports.clock:ManualClock", transfer_timeout_s=5.0, drain_timeout_s=30.0)
    receiver = eng.scheduler.receiver  # type: ignore[attr-defined]
    eng.add(request("orphan", [("dead", 60)]))
    eng.add(request("alive", [("fine", 20)]))
    for _ in range(3):
        eng.step()
    s = sender(eng)
    s.kill(ROOMS["dead"])  # it dies silently, its chunk never lands
    produce(eng)
    eng.step()
    receiver.clock.advance(6.0)
    for _ in range(10):
        produce(eng)
        eng.step()
    assert eng.finished.get("orphan") == "failed"
    assert eng.finished.get("alive") == "prefilled"
    assert_loaded(eng, "fine")
    assert receiver.queue.fenced_rooms == (ROOMS["dead"],) and eng.scheduler.has_pending_push_work()
    receiver.clock.advance(31.0)
    eng.step()
    assert receiver.queue.fenced_rooms == () and not eng.scheduler.has_pending_push_work()
    assert "dead" not in eng.caches[0] and receiver.allocator.free_count == BLOCKS


def test_bad_input_fails_only_its_own_request() -> None:
    eng = engine()
    SIZES["short"] = 50  # the producer's item is not what vLLM counts for it
    eng.add(request("r-short", [("short", 60)]))
    eng.add(request("r-garbled", [("garbled", 20)]))
    eng.add(request("r-good", [("good", 20)]))
    UNREACHABLE.add("nobody")
    eng.add(request("r-nobody", [("nobody", 20)]))  # its link cannot even be built
    eng.step()
    sender(eng).misreport(ROOMS["garbled"], 77)  # a status no sender sends
    run(eng)
    assert eng.finished == {"r-short": "failed", "r-garbled": "failed", "r-good": "prefilled", "r-nobody": "failed"}
    assert set(eng.caches[0]) == {"good"}
    assert_loaded(eng, "good")


def test_two_tensor_parallel_workers_load_the_same_items_in_the_same_step() -> None:
    eng = engine(workers=2)
    eng.add(request("tp", [("p", 70), ("q", 300)]))
    loaded_at: list[list[set[str]]] = []
    while eng.pending():
        produce(eng)
        eng.step()
        loaded_at.append([set(cache) for cache in eng.caches])
    assert all(first == second for first, second in loaded_at)
    assert eng.finished == {"tp": "prefilled"}
    assert_loaded(eng, "p")
    assert_loaded(eng, "q")


def test_an_item_a_worker_did_not_load_fails_its_request() -> None:
    eng = engine(workers=2)
    eng.add(request("split", [("half", 20)]))
    for _ in range(20):
        produce(eng)
        if eng.scheduler.has_cache_item("half"):
            eng.skip_worker = 1  # this worker misses the step that loads the item
        eng.step()
        eng.skip_worker = None
        if "split" in eng.finished:
            break
    assert eng.finished == {"split": "failed"}
