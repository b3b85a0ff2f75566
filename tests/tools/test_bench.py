"""``epd-receiver bench`` and the payload arena it measures.

The bench is run at tiny sizes so that each test takes a few seconds: these tests pin what it reports
and that the behaviour behind each figure holds (every key present, a resumed request reads the pool
exactly twice, our assembly equals the original's), never how fast anything ran.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import pytest
import torch

from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.mooncake.desk import Write, same_rows
from epd_receiver.adapters.ports.payload import EmbeddingPayload, PayloadArena
from epd_receiver.adapters.tools.bench import GOALS, run_bench
from epd_receiver.adapters.tools.bench_assembly import assembly
from epd_receiver.adapters.tools.bench_config import TINY, BenchConfig
from epd_receiver.adapters.tools.bench_mooncake import mooncake_writes
from epd_receiver.adapters.tools.bench_success import success_path
from epd_receiver.adapters.tools.cli import main

TINY_ARGS = [
    "--in-flight=20",
    "--poll-iterations=3",
    "--lifecycles=20",
    "--hidden-size=8",
    "--total-tokens=96",
    "--default-alloc=40",
    "--block-sizes",
    "4",
    "64",
    "--repeats=1",
    "--fuzz-steps=10",
]
REQUIRED_KEYS = {
    "poll_overhead_ratio",
    "transition_us",
    "assembly_vs_memcpy",
    "assembly_vs_cat_baseline",
    "peak_extra_memory_ratio",
    "reads_per_resumed_request",
    "success_path_vs_memcpy",
    "fuzz_steps_per_s",
}


def bench_json(capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, Any]]:
    code = main(["bench", *TINY_ARGS, "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def test_bench_json_prints_every_key_with_a_verdict_for_each_goal(capsys: pytest.CaptureFixture[str]) -> None:
    code, result = bench_json(capsys)
    assert code == 0
    assert result.keys() >= REQUIRED_KEYS
    assert all(isinstance(result[key], int | float) for key in REQUIRED_KEYS)
    assert set(result["goals"]) == set(GOALS) and all(isinstance(v["met"], bool) for v in result["goals"].values())
    assert [case["block_size"] for case in result["assembly_by_block_size"]] == [4, 64]
    assert result["machine"]["cpus"] >= 1 and result["config"]["hidden_size"] == 8


def test_a_resumed_request_reads_the_pool_exactly_twice(capsys: pytest.CaptureFixture[str]) -> None:
    _, result = bench_json(capsys)
    assert result["reads_per_resumed_request"] == 2 and result["max_reads_per_resumed_request"] == 2
    assert result["goals"]["reads_per_resumed_request"]["met"] is True


def test_the_human_table_names_every_goal(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    assert main(["bench", *TINY_ARGS, "--threads=1"]) == 0
    assert torch.get_num_threads() == threads  # the bench's setting does not outlive it
    out = capsys.readouterr().out
    for key in GOALS:
        assert key.replace("_", " ") in out
    assert "B=4" in out and "B=64" in out


def test_check_fails_when_a_goal_is_missed(capsys: pytest.CaptureFixture[str]) -> None:
    # At these sizes per-call overheads dominate the copies, so the bandwidth goals cannot hold.
    code, result = bench_json(capsys, "--check")
    missed = [key for key, verdict in result["goals"].items() if not verdict["met"]]
    assert missed and code == 1


def test_assembly_checks_itself_against_the_original_and_refuses_a_payload_that_fits_a0() -> None:
    figures = assembly(TINY, block_size=8)
    assert figures["payload_mib"] >= 0 and figures["arena_idle_mib"] >= 0
    with pytest.raises(ValueError, match="nothing to resume"):
        assembly(BenchConfig(hidden_size=8, total_tokens=64, default_tokens=64, repeats=1), block_size=8)


def test_the_success_path_is_the_controller_s_step_with_each_algorithm_over_memcpy() -> None:
    figures = success_path(TINY)
    assert figures["block_size"] == 4  # no B=128 in TINY: its first block size
    for name in ("xxh3_64", "crc32"):
        assert figures[f"success_{name}_ms"] > 0 and figures[f"{name}_ms"] >= 0
    assert figures["success_path_vs_memcpy"] > 0 and figures["success_path_crc32_vs_memcpy"] > 0
    assert success_path(dataclasses.replace(TINY, block_sizes=(8, 128)))["block_size"] == 128


def test_run_bench_reports_the_worst_block_size_as_the_headline() -> None:
    result = run_bench(TINY)
    cases = result["assembly_by_block_size"]
    assert result["assembly_vs_memcpy"] == min(c["assembly_vs_memcpy"] for c in cases)
    assert result["peak_extra_memory_ratio"] == max(c["peak_extra_memory_ratio"] for c in cases)


# ---- the payload arena -----------------------------------------------------------------------------


def test_a_payload_from_the_arena_is_shaped_like_a_fresh_one() -> None:
    arena = PayloadArena(hidden_size=8, deepstack_layers=2)
    got = arena.take(5, mrope_delta=-3)
    fresh = EmbeddingPayload.empty(5, 8, 2, -3)
    for name in ("embeddings", "fill_ids", "mrope_positions", "deepstack"):
        a, b = getattr(got, name), getattr(fresh, name)
        assert (a.shape, a.dtype, a.is_contiguous()) == (b.shape, b.dtype, True), name
    assert (got.total_tokens, got.mrope_delta) == (5, -3)


def test_storage_is_reused_only_after_it_is_given_back() -> None:
    arena = PayloadArena(hidden_size=4)
    first = arena.take(10)
    second = arena.take(10)
    assert first.embeddings.data_ptr() != second.embeddings.data_ptr()  # both lent: never shared
    assert arena.give_back(first) and not arena.give_back(first)  # a second give-back is ignored
    pointer = first.embeddings.data_ptr()
    del first  # nothing views the storage any more: only now may it be reused
    third = arena.take(6)  # a smaller payload fits in the storage given back
    assert third.embeddings.data_ptr() == pointer
    assert (arena.allocated, arena.reused, arena.lent) == (2, 1, 2)


def test_a_payload_the_arena_did_not_lend_is_refused() -> None:
    arena = PayloadArena(hidden_size=4)
    assert not arena.give_back(EmbeddingPayload.empty(3, 4, 0))
    assert arena.idle_bytes == 0


def test_idle_storage_beyond_the_limit_is_dropped_largest_first() -> None:
    arena = PayloadArena(hidden_size=4, max_idle_bytes=1000)
    small, large = arena.take(10), arena.take(100)
    arena.give_back(small)
    arena.give_back(large)
    assert 0 < arena.idle_bytes <= 1000
    assert arena.take(100).embeddings.data_ptr() != large.embeddings.data_ptr()


def test_reserve_prefaults_storage_that_the_next_payload_uses() -> None:
    arena = PayloadArena(hidden_size=4)
    arena.reserve(32)
    assert arena.take(32) is not None and (arena.allocated, arena.reused) == (0, 1)


def test_buffers_assemble_into_arena_storage_and_recycle_it() -> None:
    arena = PayloadArena(hidden_size=4)
    pool = TorchBlockBuffers(4, 2, 4, arena=arena)
    pool.write_block(3, torch.ones(2, 4).bfloat16(), torch.tensor([7, 8], dtype=torch.int32), torch.zeros(3, 2).int())
    payload = pool.new_payload(2, 0)
    pool.gather([3], 2, payload, 0)
    assert payload.fill_ids.tolist() == [7, 8] and arena.lent == 1
    pool.recycle(payload)
    assert arena.lent == 0
    with pytest.raises(ValueError, match="must match"):
        TorchBlockBuffers(4, 2, 8, arena=arena)


# ---- the Encode side's writes over Mooncake ------------------------------------------------------


def test_the_mooncake_writes_are_ours_and_raw_of_the_same_bytes_or_say_why_not() -> None:
    figures = mooncake_writes(TINY)
    if figures["mooncake_write_vs_raw"] is None:  # no transfer engine here: the reason is given
        assert "mooncake" in figures["mooncake_write"]["unavailable"]
        assert not os.environ.get("EPD_REQUIRE_MOONCAKE"), "CI requires the transfer engine"
        return
    write = figures["mooncake_write"]
    assert write["ranks"] == 2 and write["chunks"] > 0 and write["bytes"] > 0
    assert write["entries_per_chunk"] >= 3  # ids, positions, embeddings at least
    assert figures["mooncake_write_vs_raw"] > 0 and write["raw_gb_per_s"] > 0


def test_a_chunk_is_staged_once_and_written_to_every_rank_of_the_same_rows() -> None:
    def write(session: str, start: int, tokens: int, with_aux: bool) -> Write:
        return Write(session, (0,), start, tokens, ((0, 0, tokens),), with_aux, partial=False)

    a, b, c = write("r0", 0, 4, True), write("r1", 0, 4, True), write("r2", 4, 4, False)
    assert same_rows([a, b]) == [[a, b]]
    assert same_rows([a, c, b]) == [[a], [c], [b]]  # only neighbours: the order of writes is kept
    assert same_rows([]) == []
