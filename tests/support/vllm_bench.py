"""Items per second and GB/s through the vLLM connector with a pool smaller than every item, beside a raw copy.

Run: ``.venv/bin/python tests/support/vllm_bench.py [--items 16] [--tokens 4096] [--hidden 3584]``. The engine
is ``support.vllm_engine.Engine`` (vLLM's factory, Request, SchedulerOutput, EC mixin and aggregator); the
producer is the in-process sender writing each chunk into the pool's rows as its transfer would. Each item
is one request; the pool holds half an item, so every item comes in rounds. The raw figure copies the same
bytes with one ``copy_`` per item into memory already allocated: the floor any receive pays once.
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = args.tokens * args.hidden * 2
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
