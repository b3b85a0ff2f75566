"""Producer and consumer in two processes over Mooncake tcp on loopback, each built by vLLM's own factory.

The producer process (``support/vllm_producer_process.py``) offers its items through vLLM's EC mixin; this process
is the consumer, stepped as vLLM's scheduler and workers step it (``support/vllm_engine.py``). Every loaded
tensor is compared bit for bit with what the producer encoded. Without the transfer engine these tests skip,
naming why; CI requires them (``EPD_REQUIRE_MOONCAKE``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm.v1.request", reason="vLLM is not installed (make installs it)")

import torch
import zmq
from support.vllm_engine import Engine, request, vllm_config
from support.vllm_producer_process import encoded

from epd_receiver.adapters.integrations.vllm.mooncake import receiver_for
from epd_receiver.adapters.integrations.vllm.scheduler import room_of
from epd_receiver.adapters.ports.mooncake.bootstrap import BootstrapServer, encode_rank_endpoint
from epd_receiver.adapters.ports.mooncake.link import mooncake_missing

MISSING = mooncake_missing()
if MISSING and os.environ.get("EPD_REQUIRE_MOONCAKE"):
    raise RuntimeError(f"EPD_REQUIRE_MOONCAKE is set but {MISSING}")

B, H, BLOCKS = 64, 256, 8  # a pool of 512 tokens
SCRIPT = Path(__file__).resolve().parents[2] / "support" / "vllm_producer_process.py"
ITEMS = {
    "mc-fits": 200,
    "mc-ten-pools": 10 * B * BLOCKS,
    "mc-a": 300,
    "mc-b": 90,
    "mc-aborted": 4 * B * BLOCKS,
    "mc-orphaned": 20 * B * BLOCKS,
    "mc-after": 100,
    "mc-garbled": 3 * B * BLOCKS,
}
FAST = {"bootstrap_timeout_s": 5.0, "transfer_timeout_s": 3.0, "resume_timeout_s": 3.0, "drain_timeout_s": 3.0}


class Producer:
    def __init__(self, bootstrap: str, items: dict[str, int]) -> None:
        args = [sys.executable, str(SCRIPT), bootstrap, str(H), str(B), *(f"{h}:{t}" for h, t in items.items())]
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.strip() == "ready", f"the producer process did not start: {line!r}"

    def stats(self) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("stats\n")
        self.process.stdin.flush()
        return dict(json.loads(self.process.stdout.readline()))

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture(scope="module")
def bootstrap() -> Iterator[str]:
    if MISSING:
        pytest.skip(MISSING)
    server = BootstrapServer()
    yield server.address
    server.close()


@pytest.fixture(scope="module")
def producer(bootstrap: str) -> Iterator[Producer]:
    started = Producer(bootstrap, ITEMS)
    yield started
    started.stop()


def consumer(bootstrap: str) -> Engine:
    link = "epd_receiver.adapters.integrations.vllm.mooncake:mooncake_link"
    extra = {"hidden_size": H, "num_blocks": BLOCKS, "block_size": B, "link_factory": link, "bootstrap": bootstrap}
    return Engine(vllm_config(extra | FAST))


def receiving(bootstrap: str, request_id: str, mm_hash: str, tokens: int | None = None) -> tuple[Engine, Any]:
    """A consumer given one request of one item, and its scheduler's receiver."""
    eng = consumer(bootstrap)
    eng.add(request(request_id, [(mm_hash, ITEMS[mm_hash] if tokens is None else tokens)]))
    return eng, eng.scheduler.receiver  # type: ignore[attr-defined]


def run(eng: Engine, until: float = 60.0) -> None:
    deadline = time.monotonic() + until
    while eng.pending():
        assert time.monotonic() < deadline, "the consumer did not settle"
        eng.step()
        time.sleep(0.001)


def test_items_that_fit_and_ten_times_the_pool_arrive_bit_for_bit_over_mooncake(
    producer: Producer, bootstrap: str
) -> None:
    eng = consumer(bootstrap)
    eng.add(request("one", [("mc-fits", ITEMS["mc-fits"])]))
    eng.add(request("big", [("mc-ten-pools", ITEMS["mc-ten-pools"])]))
    eng.add(request("two", [("mc-a", ITEMS["mc-a"]), ("mc-b", ITEMS["mc-b"])]))
    run(eng)
    assert eng.finished == {"one": "prefilled", "big": "prefilled", "two": "prefilled"} and not eng.encoded_locally
    for mm_hash in ("mc-fits", "mc-ten-pools", "mc-a", "mc-b"):
        assert torch.equal(eng.caches[0][mm_hash], encoded(mm_hash, ITEMS[mm_hash], H)), mm_hash
    receiver = eng.scheduler.receiver  # type: ignore[attr-defined]
    assert receiver.allocator.free_count == BLOCKS


def step_until_resumed(eng: Any, receiver: Any, mm_hash: str) -> None:
    """Engine steps until the item has been resumed at least once: the producer is mid-transfer."""
    deadline = time.monotonic() + 30
    while (r := receiver.queue.get(room_of(mm_hash))) is None or r.resumes == 0:
        assert time.monotonic() < deadline
        eng.step()


def test_an_abort_mid_transfer_is_acknowledged_by_the_producer_before_its_blocks_return(
    producer: Producer, bootstrap: str
) -> None:
    eng, receiver = receiving(bootstrap, "gone", "mc-aborted")
    step_until_resumed(eng, receiver, "mc-aborted")
    eng.abort("gone")
    began = time.monotonic()
    run(eng)
    assert time.monotonic() - began < FAST["drain_timeout_s"]  # the producer said it stopped: no drain wait
    assert "mc-aborted" not in eng.caches[0] and receiver.allocator.free_count == BLOCKS


def test_a_write_the_consumer_refuses_stops_the_producer_which_serves_the_next_item(
    producer: Producer, bootstrap: str
) -> None:
    """The consumer's pool is unregistered mid-transfer (what a consumer's death looks like to the producer's
    engine): the next write is refused, the producer ends the room, and it goes on serving others."""
    eng, receiver = receiving(bootstrap, "left", "mc-orphaned")
    step_until_resumed(eng, receiver, "mc-orphaned")
    refused = producer.stats()["failed_writes"]
    pool = receiver_for(receiver.buffers, {})
    pool._engine.unregister(receiver.buffers.buffers())  # every later write into it is refused
    run(eng)
    assert eng.finished == {"left": "failed"} and not receiver.queue.fenced_rooms  # the producer's Failed lifts it
    assert producer.stats()["failed_writes"] == refused + 1  # one write refused, then the producer stopped
    other = consumer(bootstrap)
    other.add(request("next", [("mc-after", ITEMS["mc-after"])]))
    run(other)
    assert other.finished == {"next": "prefilled"}
    assert torch.equal(other.caches[0]["mc-after"], encoded("mc-after", ITEMS["mc-after"], H))


def test_garbled_frames_are_dropped_and_counted_on_both_sides_and_the_item_still_arrives(
    producer: Producer, bootstrap: str
) -> None:
    eng, receiver = receiving(bootstrap, "noisy", "mc-garbled")
    eng.step()
    pool = receiver_for(receiver.buffers, {})
    before = sum(producer.stats()["dropped"].values())
    context = zmq.Context.instance()
    for endpoint in (encode_rank_endpoint(bootstrap, 0, 0), f"127.0.0.1:{pool.port}"):
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(f"tcp://{endpoint}")
        push.send_multipart([str(room_of("mc-garbled")).encode(), b"\xff garbled", b"7"])
        push.send_multipart([b"not a room"])
        push.close()
    run(eng)
    assert eng.finished == {"noisy": "prefilled"}
    assert torch.equal(eng.caches[0]["mc-garbled"], encoded("mc-garbled", ITEMS["mc-garbled"], H))
    assert sum(pool.dropped.values()) >= 2 and sum(producer.stats()["dropped"].values()) >= before + 2


def test_a_producer_that_dies_mid_transfer_fails_the_request_and_fences_until_the_drain_deadline(
    bootstrap: str,
) -> None:
    own = BootstrapServer()  # the module's producer stays registered with the shared one
    victim = Producer(own.address, {"mc-victim": 20 * B * BLOCKS})
    try:
        eng, receiver = receiving(own.address, "orphan", "mc-victim", 20 * B * BLOCKS)
        deadline = time.monotonic() + 30
        while (r := receiver.queue.get(room_of("mc-victim"))) is None or r.resumes < 2:
            assert time.monotonic() < deadline
            eng.step()
        victim.process.kill()
        victim.process.wait()
        run(eng)
        assert eng.finished == {"orphan": "failed"} and "mc-victim" not in eng.caches[0]
        assert receiver.allocator.free_count == BLOCKS and not receiver.queue.fenced_rooms
    finally:
        victim.stop()
        own.close()
