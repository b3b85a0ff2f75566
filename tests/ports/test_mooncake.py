"""The real transport end to end: two rank processes over gloo, one Encode process, Mooncake over loopback tcp.

The processes start once for the module (a Python process with torch costs seconds) and every test runs
a workload on them; the fault test kills the Encode process and the next use starts a fresh one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from epd_receiver.adapters.kit.world_config import WorldConfig
from epd_receiver.adapters.ports.mooncake.link import Geometry, coalesce, mooncake_missing
from epd_receiver.adapters.tools.encode.write import write_entries
from epd_receiver.adapters.tools.simulate import Workload

MISSING = mooncake_missing()
if MISSING and os.environ.get("EPD_REQUIRE_MOONCAKE"):
    raise RuntimeError(f"EPD_REQUIRE_MOONCAKE is set but {MISSING}")

B, H = 16, 64
FAST = {name: 2.0 for name in ("bootstrap", "admission", "transfer", "blocks", "resume")}


def world(**timeouts: float | None) -> WorldConfig:
    return WorldConfig(block_size=B, num_blocks=64, default_alloc_tokens=128, hidden_size=H, timeouts=timeouts)


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    if MISSING:
        pytest.skip(MISSING)
    from epd_receiver.adapters.tools.distributed import Cluster

    with Cluster(2) as started:
        yield started


# ---- the write arithmetic, without processes ---------------------------------------------------------


ITEM_LENS = (B * H * 2, B * 4, 3 * B * 4, 64)  # TorchBlockBuffers for B=16, H=64: embeddings, ids, M-RoPE, aux


def _bases(base: int) -> tuple[int, ...]:
    return (base, base + 10**6, base + 2 * 10**6, base + 3 * 10**6)


def test_each_buffer_moves_the_bytes_of_the_tokens_a_block_holds() -> None:
    entries = list(write_entries(_bases(0), _bases(10**8), ITEM_LENS, B, [(0, 5, B), (1, 9, 3)], with_aux=True))
    lengths = [length for _, _, length in entries]
    assert lengths == [B * H * 2, 3 * H * 2, B * 4, 3 * 4, 3 * B * 4, 3 * 3 * 4, 64]  # aux once, first pair
    embeddings_of_second = entries[1]
    assert embeddings_of_second[0] == 1 * B * H * 2 and embeddings_of_second[1] == 10**8 + 9 * B * H * 2


def test_a_resume_writes_no_aux_row() -> None:
    entries = list(write_entries(_bases(0), _bases(10**8), ITEM_LENS, B, [(0, 7, B)], with_aux=False))
    assert len(entries) == 3


def test_rows_that_continue_each_other_on_both_sides_become_one_entry() -> None:
    pairs = [(0, 4, B), (1, 5, B), (2, 9, B)]
    _, _, lengths = coalesce(write_entries(_bases(0), _bases(10**8), ITEM_LENS, B, pairs, with_aux=False))
    assert len(lengths) == 6  # rows 4 and 5 merge in each of three buffers; row 9 stands alone
    assert sum(lengths) == 3 * (B * H * 2 + B * 4 + 3 * B * 4)


# ---- end to end ------------------------------------------------------------------------------------


def test_loopback_two_ranks_every_payload_verified_on_every_rank(cluster) -> None:  # type: ignore[no-untyped-def]
    workload = Workload(requests=24, seed=3, fail_rate=0.1, abort_rate=0.1, progress_share=0.3)
    summary = cluster.run(world(), workload, checksum=True)
    assert summary["violations"] == []
    assert summary["unfinished"] == 0 and summary["leaked_blocks"] == 0
    assert summary["succeeded"] > 10 and summary["verified"] == summary["succeeded"]
    assert summary["verified_on_every_rank"] and summary["ranks"] == 2
    assert summary["resumed"] > 0
    assert set(summary["causes"]) <= {"aborted", "sender_failed"}
    assert summary["fenced_blocks"] == [0, 0]  # every fence lifted: the sender acknowledged each abort
    assert all(rank["extension"] and rank["dropped"] == {} for rank in summary["per_rank"])
    # One rank's abort may overtake the other rank's init of the same room: that init is then stale.
    assert set(summary["transfer"]["encode_dropped"]) <= {"stale"}
    transfer = summary["transfer"]
    assert transfer["bytes"] > 0 and transfer["failed_writes"] == 0
    # Every chunk was mirrored by a raw write of as many bytes into rank 0's scratch, never into a pool: every
    # payload above verified. And once more on the idle machine, into rank 0's pool, after the workload.
    assert transfer["raw_bytes"] == transfer["bytes"] and transfer["write_vs_raw"] > 0
    assert transfer["idle_raw_rc"] == 0 and transfer["write_vs_idle_raw"] > 0


def test_a_pool_smaller_than_the_payload_fills_in_rounds(cluster) -> None:  # type: ignore[no-untyped-def]
    from epd_receiver.adapters.tools.rank_job import Arrival

    config = WorldConfig(block_size=B, num_blocks=8, default_alloc_tokens=64, hidden_size=H)
    summary = cluster.run(config, Workload(seed=5), [Arrival(0, 8 * B * 3 + 5, progress=True), Arrival(1, 40)])
    assert summary["violations"] == [] and summary["verified"] == 2
    assert summary["resume_rounds"] >= 3


def test_a_transfer_error_fails_that_request_with_the_engine_s_answer(cluster) -> None:  # type: ignore[no-untyped-def]
    from epd_receiver.adapters.ports.mooncake.desk import TRANSFER_ERROR_ON_RESUME
    from epd_receiver.adapters.tools.rank_job import Arrival

    arrivals = [Arrival(0, 400, fault=TRANSFER_ERROR_ON_RESUME), Arrival(1, 300), Arrival(2, 50)]
    summary = cluster.run(world(), Workload(seed=7), arrivals)
    assert summary["violations"] == []
    assert summary["succeeded"] == summary["verified"] == 2
    assert summary["causes"] == {"sender_failed": 1}
    assert any("the transfer engine returned -1" in error for error in summary["errors"][0])
    # Both ranks' shares of the chunk go out together and each is refused; the room stops there, as the fork's
    # does at its first failed write: no later chunk of it is written.
    assert summary["transfer"]["failed_writes"] == 2


def test_encode_process_killed_mid_resume_times_out_everywhere(cluster) -> None:  # type: ignore[no-untyped-def]
    """Small requests land first; the Encode process dies halfway through the first resume chunk."""
    from epd_receiver.adapters.tools.rank_job import Arrival

    arrivals = [Arrival(room, 40 + room) for room in range(4)] + [Arrival(room, 500 + room) for room in range(4, 8)]
    cluster.ensure_encode().arm_kill(resumes=1)
    config = world(
        **{f"{name}_timeout_s": s for name, s in FAST.items()}, drain_timeout_s=None
    )  # fences wait for a sender that will never answer
    summary = cluster.run(config, Workload(seed=11, arrivals_per_step=8), arrivals, settle_s=0.5, bench=False)
    assert not cluster.encode.alive
    assert summary["violations"] == []  # every rank ended every room alike; no block owned at the end
    assert summary["succeeded"] == summary["verified"] == 4
    assert summary["causes"] == {"timeout": 4}
    assert summary["leaked_blocks"] == 0
    for rank in summary["per_rank"]:
        # Blocks the dead sender was writing stay fenced, attributed to the rooms that timed out.
        assert rank["fenced_blocks"] > 0 and set(rank["fenced_rooms"]) <= {4, 5, 6, 7}
    again = cluster.run(world(), Workload(requests=6, seed=12))  # a fresh Encode process
    assert again["violations"] == [] and again["verified"] == again["succeeded"] > 0


def test_our_encode_process_serves_the_fork_s_language_side(cluster) -> None:  # type: ignore[no-untyped-def]
    """A stand-in of the fork's Language manager (``fork_wire_fakes.ForkLanguage``): it announces nothing,
    so it must only ever receive two-frame statuses, and it reads the payload exactly as written."""
    from support.fork_wire_fakes import ForkLanguage

    from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
    from epd_receiver.adapters.ports.mooncake.desk import RoomPlan
    from epd_receiver.adapters.ports.mooncake.link import Engine, Geometry
    from epd_receiver.adapters.tools.encode.write import regenerate, source_generator

    geometry, seed = Geometry(16, B, H, 0), 21
    encode = cluster.ensure_encode()
    encode.control.begin(geometry, [RoomPlan(1, 40, seed), RoomPlan(2, 2 * B + 23, seed), RoomPlan(3, 10, seed)])
    engine, pool = Engine(), TorchBlockBuffers(16, B, H)
    engine.register(pool.buffers())
    fork = ForkLanguage(cluster.bootstrap.address, engine.session, pool.get_buf_infos()[0], B)
    generator = source_generator(seed, geometry)
    try:
        fork.init(1, [4, 5, 6])  # 48 tokens allocated for 40: one chunk
        assert fork.wait_for(1, {0, 4}) == 4
        aux = pool.read_aux(4)
        assert aux.total_tokens == 40
        payload = pool.new_payload(40, aux.mrope_delta)
        pool.gather([4, 5, 6], 40, payload, 0)
        assert regenerate(generator, 1, 40).mismatches(payload) == []

        fork.init(2, [0, 1])  # 2B of 2B + 23 tokens, then the remainder in one resume, as the fork does
        assert fork.wait_for(2, {0, 3, 4}) == 3
        aux = pool.read_aux(0)
        assert aux.total_tokens == 2 * B + 23
        payload = pool.new_payload(aux.total_tokens, aux.mrope_delta)
        pool.gather([0, 1], 2 * B, payload, 0)
        fork.resume(2, [7, 8], 2 * B)
        assert fork.wait_for(2, {0, 4}) == 4
        pool.gather([7, 8], 23, payload, 2 * B)
        assert regenerate(generator, 2, 2 * B + 23).mismatches(payload) == []

        fork.init(3, [2, 3], allocated=3 * B)  # not len(blocks) * B: the room fails, the process lives
        assert fork.wait_for(3, {0, 4}) == 0
        assert fork.died is None and all(len(frames) == 2 for frames in fork.messages)
        assert encode.stats()["dropped"] == {} and encode.alive
    finally:
        fork.close()
        engine.unregister(pool.buffers())


def test_junk_on_the_wire_ends_no_process_and_fails_no_request(cluster) -> None:  # type: ignore[no-untyped-def]
    import zmq

    from epd_receiver.adapters.ports.mooncake.bootstrap import encode_rank_endpoint

    encode = cluster.ensure_encode()
    encode.control.begin(Geometry(64, B, H, 0), [])
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(f"tcp://{encode_rank_endpoint(cluster.bootstrap.address, 0, 0)}")
    junk = [[b"None"], [b"7", b"x"], [b"\xff"] * 7, [b"7", b"127.0.0.1", b"1", b"127.0.0.1:2", b"1", b"1", b"8"]]
    for frames in junk:
        push.send_multipart(frames)
    push.close()
    deadline = time.monotonic() + 10
    while sum(encode.stats()["dropped"].values()) < len(junk) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert encode.stats()["dropped"] == {"truncated": 2, "malformed": 1, "unknown_peer": 1} and encode.alive
    summary = cluster.run(world(), Workload(requests=6, seed=13))
    assert summary["violations"] == [] and summary["verified"] == summary["succeeded"] == 6


def test_several_ranks_need_the_real_transport(capsys: pytest.CaptureFixture[str]) -> None:
    from epd_receiver.adapters.tools.cli import main

    assert main(["simulate", "--ranks", "2", "--requests", "1"]) == 2
    assert "--transport mooncake" in capsys.readouterr().err


def test_a_raw_target_mirrors_each_chunk_and_a_refused_mirror_stops_only_the_mirrors(cluster) -> None:  # type: ignore[no-untyped-def]
    """The same-run raw figure: each chunk is followed by a raw write of as many bytes into the scratch named,
    never into the pool; a scratch the engine refuses ends the mirrors, not the room nor the process."""
    import torch
    from support.fork_wire_fakes import ForkLanguage

    from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
    from epd_receiver.adapters.ports.mooncake.desk import RoomPlan
    from epd_receiver.adapters.ports.mooncake.link import Engine
    from epd_receiver.adapters.tools.encode.write import regenerate, source_generator

    geometry, seed = Geometry(16, B, H, 0), 23
    encode = cluster.ensure_encode()
    encode.control.begin(geometry, [RoomPlan(1, 40, seed), RoomPlan(2, 2 * B + 7, seed)])
    engine, pool = Engine(), TorchBlockBuffers(16, B, H)
    scratch, unregistered = torch.zeros(B * H * 2, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)
    engine.register([*pool.buffers(), scratch])
    fork = ForkLanguage(cluster.bootstrap.address, engine.session, pool.get_buf_infos()[0], B)
    generator = source_generator(seed, geometry)
    try:
        before = encode.stats()
        encode.control.raw_target(engine.session, scratch)
        fork.init(1, [4, 5, 6])
        assert fork.wait_for(1, {0, 4}) == 4
        mirrored = encode.stats()
        written = mirrored["bytes"] - before["bytes"]
        assert written > scratch.nbytes  # in several raw writes, each as large as the scratch
        assert mirrored["raw_bytes"] - before["raw_bytes"] == written and scratch.any()
        payload = pool.new_payload(40, pool.read_aux(4).mrope_delta)
        pool.gather([4, 5, 6], 40, payload, 0)
        assert regenerate(generator, 1, 40).mismatches(payload) == []

        scratch_pointer = unregistered.data_ptr() + (1 << 40)  # outside anything registered: refused
        encode.control.call("raw_target", session=engine.session, pointer=scratch_pointer, bytes=64)
        fork.init(2, [0, 1, 2])
        assert fork.wait_for(2, {0, 4}) == 4
        after = encode.stats()
        assert after["raw_bytes"] == mirrored["raw_bytes"] and after["bytes"] > mirrored["bytes"]
        assert after["failed_writes"] == before["failed_writes"] and encode.alive
        payload = pool.new_payload(2 * B + 7, pool.read_aux(0).mrope_delta)
        pool.gather([0, 1, 2], 2 * B + 7, payload, 0)
        assert regenerate(generator, 2, 2 * B + 7).mismatches(payload) == []
    finally:
        fork.close()
        engine.unregister([*pool.buffers(), scratch])
