"""``epd-receiver bench``: what the controller costs a scheduler, measured against the limits that matter.

Every ratio is measured side by side in one process, interleaved, so that both sides see the same machine:

- the poll overhead of one scheduler iteration over many in-flight requests whose polls change nothing,
  against a hand-written if/elif loop with the original receiver's logic (both poll the same links);
- the mean cost of a step that changes state;
- the bandwidth of assembling a resumed payload (A0 and the resume blocks into the output the caller
  receives, allocation included) against a plain ``copy_`` of as many bytes into memory already
  allocated, and against the original's per-block ``get_buf`` and ``torch.cat`` merge;
- the peak memory allocated while assembling, over the payload's bytes (torch's own allocation events);
- the Success path of a checksummed payload on one rank of two (gather, the payload's digest once for
  integrity and agreement) against a ``copy_`` of as many bytes, with xxh3-64 and with CRC32;
- the Encode side's chunk writes into two ranks over Mooncake tcp against raw engine writes of as many
  bytes (``bench_mooncake.py``; None, and the goal missed, where the transfer engine cannot be imported);
- how often a resumed request reads the pool, and how fast the protocol fuzzer runs.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict
from typing import Any

import torch

from epd_receiver.adapters.tools.bench_assembly import assembly
from epd_receiver.adapters.tools.bench_config import FULL, BenchConfig
from epd_receiver.adapters.tools.bench_mooncake import mooncake_writes
from epd_receiver.adapters.tools.bench_polls import poll_overhead, transitions
from epd_receiver.adapters.tools.bench_scale import scale
from epd_receiver.adapters.tools.bench_success import success_path
from epd_receiver.adapters.tools.bench_timing import seconds

# The measurements live in bench_polls.py and bench_assembly.py; these names are still importable from here.
GOALS: dict[str, tuple[str, float]] = {
    "poll_overhead_ratio": ("<=", 1.2),
    "transition_us": ("<=", 25.0),
    "assembly_vs_memcpy": (">=", 0.8),
    "assembly_vs_cat_baseline": (">=", 2.0),
    "peak_extra_memory_ratio": ("<=", 1.0),
    "reads_per_resumed_request": ("==", 2.0),
    "success_path_vs_memcpy": ("<=", 1.3),
    "mooncake_write_vs_raw": (">=", 0.9),
    # bench_scale.py: at 1,000, 10,000 and 50,000 in flight (the worst size is the figure)
    "scale_quiet_growth": ("<=", 1.2),  # a quiet iteration's cost per request, largest size over smallest
    "scale_quiet_vs_baseline": ("<=", 1.2),  # over the hand-written loop at the same size
    "add_us": ("<=", 20.0),
    "release_us": ("<=", 20.0),
    "state_change_us": ("<=", 25.0),  # a request's state-changing step, its payload's copy excluded
    "bytes_per_request": ("<=", 4096),  # kept per admitted request, beyond its link and blocks
}


# ---- the fuzzer ------------------------------------------------------------------------------------


def fuzz_rate(steps: int, seed: int = 0) -> float | None:
    """Rule steps per second of the protocol fuzzer (every invariant judged after each); None without hypothesis."""
    try:
        from hypothesis import HealthCheck, Phase, settings
        from hypothesis.stateful import invariant, run_state_machine_as_test
    except ImportError:
        return None
    from epd_receiver.adapters.kit.fuzz import ReceiverProtocol

    counted = [0]

    class Counted(ReceiverProtocol):
        @invariant()
        def count_the_step(self) -> None:
            counted[0] += 1

    step_count = 50
    options = settings(
        max_examples=max(1, math.ceil(steps / step_count)),
        stateful_step_count=step_count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    elapsed = seconds(lambda: run_state_machine_as_test(Counted, settings=options))
    return round(counted[0] / elapsed, 1)


def walk_rate(steps: int, seed: int = 0) -> float:
    """Judged steps per second of the random walk (``walk.py``) on one rank, as ``fuzz_rate``: every
    invariant judged after each event; building the worlds and draining them are in the time, and an
    event the World refused is judged but not counted. (Whether the walk is clean is the tests' business.)"""
    from epd_receiver.adapters.kit.walk import walk

    return walk(steps, seed).steps_per_s


# ---- the whole bench -------------------------------------------------------------------------------


def run_bench(config: BenchConfig = FULL) -> dict[str, Any]:
    """Every figure, the worst case over the block sizes as the headline, and each goal's verdict.

    ``threads`` matters on a small shared machine: a multi-threaded copy waits at its barrier for a thread
    that a neighbour's process has preempted, and indexed copies suffer more from it than a plain one.
    """
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_bench(config)
    finally:
        torch.set_num_threads(threads)


def _run_bench(config: BenchConfig) -> dict[str, Any]:
    result: dict[str, Any] = {}
    result |= poll_overhead(config)
    result |= transitions(config)
    result |= scale(config)
    cases = [assembly(config, b) for b in config.block_sizes]
    result["assembly_by_block_size"] = cases
    result["assembly_vs_memcpy"] = min(c["assembly_vs_memcpy"] for c in cases)
    result["assembly_vs_cat_baseline"] = min(c["assembly_vs_cat_baseline"] for c in cases)
    result["peak_extra_memory_ratio"] = max(c["peak_extra_memory_ratio"] for c in cases)
    result["success_path"] = success_path(config)
    result["success_path_vs_memcpy"] = result["success_path"]["success_path_vs_memcpy"]
    result |= mooncake_writes(config)
    result["fuzz_steps_per_s"] = fuzz_rate(config.fuzz_steps, config.seed)
    # twenty times the fuzzer's steps: at the walk's rate, a span of the same order as the fuzzer's
    result["walk_steps_per_s"] = walk_rate(20 * config.fuzz_steps, config.seed)
    result["goals"] = {key: _verdict(key, result[key]) for key in GOALS}
    result["machine"] = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    result["config"] = asdict(config)
    return result


def _verdict(key: str, value: float | None) -> dict[str, Any]:
    """Whether a figure meets its goal; one that could not be measured here (None) does not."""
    op, goal = GOALS[key]
    if value is None:
        return {"goal": f"{op} {goal:g}", "met": False}
    met = {"<=": value <= goal, ">=": value >= goal, "==": value == goal}[op]
    return {"goal": f"{op} {goal:g}", "met": met}
