"""How the controller's costs grow with the work: quiet iterations, admissions, releases and state changes
at several numbers of requests in flight, each size beside the hand-written loop at the same size.

A cost that grows per request with the number of requests is a scan that should not be there: a quiet
iteration should cost its polls, an admission or a release a constant, a state change its own work.
Memory per admitted request (tracemalloc, beyond its link, which the caller made) is measured here too.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from typing import Any

from epd_receiver.adapters.tools.bench_config import BenchConfig
from epd_receiver.adapters.tools.bench_polls import ScriptedLink, quiet_seconds, resumed_queue
from epd_receiver.adapters.tools.bench_timing import seconds
from epd_receiver.fsm import KVPoll, State

# Requests changed, admitted and released per repeat at each size: at least this many, and one in fifty
# of those in flight, so that their work stands above the noise of one iteration over 50,000 polls while
# a scan of every request on a changing step would still show (a microsecond or more per change).
BATCH = 100


def scale(config: BenchConfig) -> dict[str, Any]:
    """The figures at each of ``config.scale_sizes`` in flight, the worst of them as the headlines, and the
    memory per request."""
    rows = [_at_size(n, config) for n in config.sizes]
    first, last = rows[0], rows[-1]
    return {
        "scale": rows,
        "scale_quiet_growth": round(last["quiet_ns_per_request"] / first["quiet_ns_per_request"], 3),
        "scale_quiet_vs_baseline": max(row["quiet_vs_baseline"] for row in rows),
        "add_us": max(row["add_us"] for row in rows),
        "release_us": max(row["release_us"] for row in rows),
        "state_change_us": max(row["state_change_us"] for row in rows),
        "bytes_per_request": bytes_per_request(config.memory_requests_resolved),
    }


def _at_size(n: int, config: BenchConfig) -> dict[str, Any]:
    gc.collect()  # the last size's requests go now, not during this one's timing
    ours = resumed_queue(n)
    queue = ours.queue
    # As many polls per repeat at every size (at least one iteration), so the sizes take alike long.
    iterations = max(1, config.poll_iterations * config.in_flight // n)
    quiet_s, original_s = quiet_seconds(ours, iterations, config.repeats)

    batch = max(1, min(max(BATCH, n // 50), n // (2 * config.repeats)))
    change, add, release = [], [], []
    room = n
    for repeat in range(config.repeats):
        changed = ours.links[repeat * batch : (repeat + 1) * batch]
        for link in changed:
            link.status = int(KVPoll.Success)
        # The step that changes them and the next, whose extra work (if any) the change also caused; less
        # their polls, and less the copies of their payloads, which their size decides, not the controller.
        copied = ours.buffers.gather_seconds
        steps = seconds(queue.step) + seconds(queue.step)
        change.append(steps - 2 * quiet_s - (ours.buffers.gather_seconds - copied))
        done = [r.room for r in queue if r.state is State.SUCCESS]
        if len(done) != batch:
            raise RuntimeError(f"{len(done)} requests succeeded, {batch} expected")
        started = time.perf_counter()
        for finished in done:
            queue.release(finished)
        release.append(time.perf_counter() - started)
        arrivals = [(room + i, ScriptedLink()) for i in range(batch)]
        started = time.perf_counter()
        for new, link in arrivals:
            queue.add(new, link)
        add.append(time.perf_counter() - started)
        room += batch
    return {
        "in_flight": n,
        "quiet_ns_per_request": round(quiet_s / n * 1e9, 1),
        "baseline_ns_per_request": round(original_s / n * 1e9, 1),
        "quiet_vs_baseline": round(quiet_s / original_s, 3),
        "add_us": round(min(add) / batch * 1e6, 2),
        "release_us": round(min(release) / batch * 1e6, 2),
        "state_change_us": round(max(0.0, min(change)) / batch * 1e6, 2),
    }


def bytes_per_request(requests: int) -> int:
    """Bytes that stay allocated per admitted request, its link (made beforehand) excluded; it holds no
    blocks yet. The queue is built before tracing starts, so only what admission keeps is counted."""
    ours = resumed_queue(1)
    links = [ScriptedLink() for _ in range(requests)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for room, link in enumerate(links, start=1):
            ours.queue.add(room, link)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return round((after - before) / requests)
