"""Items per second and GB/s through the vLLM connector with a pool smaller than every item, beside a raw copy.

Run: ``.venv/bin/python tests/support/vllm_bench.py [--items 16] [--tokens 4096] [--hidden 3584]`` (add
``--transport mooncake`` for a producer process writing over Mooncake tcp on loopback, beside a raw
``batch_transfer_sync_write`` of the same bytes between two engines of this process). The engine
is ``support.vllm_engine.Engine`` (vLLM's factory, Request, SchedulerOutput, EC mixin and aggregator); the
producer is the in-process sender writing each chunk into the pool's rows as its transfer would. Each item
is one request; the pool holds half an item, so every item comes in rounds. The raw figure copies the same
bytes with one ``copy_`` per item into memory already allocated: the floor any receive pays once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.vllm_engine import Engine, request, vllm_config
from support.vllm_links import FACTORY, sender_for


def through_connector(items: int, tokens: int, hidden: int, block: int, blocks: int) -> tuple[float, float]:
    """(seconds in all, seconds in the engine's steps alone): the producer's writes run in another process
    in a deployment, so the second is what the consumer pays."""
    extra = {"hidden_size": hidden, "num_blocks": blocks, "block_size": block, "link_factory": FACTORY}
    eng = Engine(vllm_config(extra))
    receiver = eng.scheduler.receiver  # type: ignore[attr-defined]
    for i in range(items):
        eng.add(request(f"r{i}", [(f"bench-{i}", tokens)]))
    sender = sender_for(receiver.buffers)
    began, stepping = time.perf_counter(), 0.0
    while eng.pending():
        for room in sender.rooms():
            sender.deliver(room)
        step_began = time.perf_counter()
        eng.step()
        stepping += time.perf_counter() - step_began
    seconds = time.perf_counter() - began
    loaded = eng.caches[0]
    assert len(loaded) == items and all(t.shape == (tokens, hidden) for t in loaded.values())
    return seconds, stepping


def over_mooncake(items: int, tokens: int, hidden: int, block: int, blocks: int, a0: int) -> float:
    """Seconds for ``items`` requests of one item each, from a producer process over Mooncake tcp."""
    from epd_receiver.adapters.ports.mooncake.bootstrap import BootstrapServer

    server = BootstrapServer()
    script = Path(__file__).resolve().parent / "vllm_producer_process.py"
    specs = [f"bench-mc-{i}:{tokens}" for i in range(items)]
    args = [sys.executable, str(script), server.address, str(hidden), str(block), *specs]
    producer = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert producer.stdout is not None and producer.stdout.readline().strip() == "ready"
        link = "epd_receiver.adapters.integrations.vllm.mooncake:mooncake_link"
        extra = {"hidden_size": hidden, "num_blocks": blocks, "block_size": block, "link_factory": link}
        eng = Engine(vllm_config(extra | {"bootstrap": server.address, "default_alloc_tokens": a0 or block}))
        eng.step()  # the first item connects to the producer (bootstrap, registration, hello): not timed
        began = time.perf_counter()
        for i in range(items):
            eng.add(request(f"r{i}", [(f"bench-mc-{i}", tokens)]))
        while eng.pending():
            eng.step()
        seconds = time.perf_counter() - began
        assert len(eng.caches[0]) == items
        return seconds
    finally:
        assert producer.stdin is not None
        producer.stdin.close()
        producer.wait(timeout=30)
        server.close()


def raw_mooncake(items: int, tokens: int, hidden: int, span: int) -> float:
    """The same bytes in writes of ``span`` bytes (what one pool holds) between two engines on loopback."""
    from epd_receiver.adapters.ports.mooncake.link import Engine as TransferEngine

    writer, reader = TransferEngine(), TransferEngine()
    source = torch.randn(tokens, hidden).to(torch.bfloat16)
    target = torch.empty(span // 2, dtype=torch.bfloat16)
    writer.register([source])
    reader.register([target])
    began = time.perf_counter()
    for _ in range(items):
        for offset in range(0, source.nbytes, span):
            length = min(span, source.nbytes - offset)
            assert writer.write(reader.session, [source.data_ptr() + offset], [target.data_ptr()], [length]) == 0
    return time.perf_counter() - began


def raw_copy(items: int, tokens: int, hidden: int) -> float:
    source = torch.randn(tokens, hidden).to(torch.bfloat16)
    target = torch.empty_like(source)
    began = time.perf_counter()
    for _ in range(items):
        target.copy_(source)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--transport", choices=["in-process", "mooncake"], default="in-process")
    parser.add_argument("--a0-tokens", type=int, default=0, help="the first allocation (default: one block)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = args.tokens * args.hidden * 2
    if args.transport == "mooncake":
        gb, span = args.items * size / 1e9, args.block * args.blocks * args.hidden * 2
        seconds = min(
            over_mooncake(args.items, args.tokens, args.hidden, args.block, args.blocks, args.a0_tokens)
            for _ in range(args.repeats)
        )
        raw = min(raw_mooncake(args.items, args.tokens, args.hidden, span) for _ in range(args.repeats))
        figures = {"item_mb": size / 1e6, "pool_mb": span / 1e6, "items": args.items, "a0_tokens": args.a0_tokens}
        figures |= {"connector_items_per_s": args.items / seconds, "connector_gb_per_s": gb / seconds}
        print(json.dumps(figures | {"raw_transfer_gb_per_s": gb / raw, "threads": args.threads}, indent=1))
        return
    runs = [
        through_connector(args.items, args.tokens, args.hidden, args.block, args.blocks) for _ in range(args.repeats)
    ]
    connector, consumer = min(r[0] for r in runs), min(r[1] for r in runs)
    raw = min(raw_copy(args.items, args.tokens, args.hidden) for _ in range(args.repeats))
    gb = args.items * size / 1e9
    print(
        json.dumps(
            {
                "item_mb": size / 1e6,
                "pool_mb": args.block * args.blocks * args.hidden * 2 / 1e6,
                "items": args.items,
                "connector_items_per_s": args.items / connector,
                "connector_gb_per_s": gb / connector,
                "consumer_items_per_s": args.items / consumer,
                "consumer_gb_per_s": gb / consumer,
                "raw_copy_gb_per_s": gb / raw,
                "threads": args.threads,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
