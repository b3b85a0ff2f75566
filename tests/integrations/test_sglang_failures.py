"""Failures and aborts through the SGLang bridge, answered the fork's way.

A failure is answered inside ``pop_transferred`` with ``prepare_abort`` and ``stream_output``: a sender's
Failed, the Encode side's refused writes and its dead transfer worker, a prompt longer than its expansion,
a failed bootstrap, a receiver that cannot be built. An abort through the scheduler's own handler fences
the blocks the sender may still write. The harness is ``sglang_bridge_bench.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from support.sglang_bridge_bench import (
    DRAIN,
    FAST,
    PORT,
    SLOW,
    TRANSFER_TIMEOUT,
    B,
    Fork,
    H,
    N,
    aborted_with_500,
    delivered_mismatch,
)
from support.sglang_fork_encode import EncodeSide as ForkEncodeSide
from support.sglang_fork_receiver import BootstrapServer
from support.sglang_fork_scheduler import Req

from epd_receiver.fsm import KVPoll

# ---- failures: answered inside pop_transferred, the fork's way --------------------------------------


def test_a_sender_failure_is_answered_inside_pop_transferred_with_prepare_abort_and_stream_output() -> None:
    fork = Fork()
    req = fork.arrive(1, total=21, own_length=5)
    fork.iterate(2, deliver=False)
    fork.encode[FAST].fail(1)  # the Encode side's write failed: it reports Failed
    answered: list[int] = []
    transfer = fork.scheduler.disagg_language_transfer_queue
    pop = transfer.pop_transferred

    def watched() -> list[Any]:
        ready = pop()
        answered.append(len(fork.scheduler.streamed))
        return ready

    transfer.pop_transferred = watched
    fork.iterate(1, deliver=False)
    assert answered == [1] and fork.scheduler.streamed == [req]  # in the same call, once
    message = aborted_with_500(req)
    assert "SenderFailed" in message or "sender" in message.lower()
    assert "Failed to get embedding data" in message  # the fork's failure record, via failure_exception()
    assert fork.bridge.allocator.fenced_count == 0  # the Encode side said it stopped: nothing to fence
    fork.assert_clean()


def test_after_one_refused_write_the_encode_side_fails_the_sessions_every_request_and_nothing_is_fenced() -> None:
    """The fork's Encode side marks the Language session failed at the first refused write and from then on
    fails every chunk of it without writing, until the session registers again, which a Language side
    does once per connection (or after losing the address's heartbeat). Each of those Failed statuses is
    the Encode side's own word: the bridge answers the requests and fences nothing."""
    fork = Fork()
    side, session = fork.encode[SLOW], fork.manager.get_session_id()
    resumed = fork.arrive(1, total=21, own_length=5, host=SLOW)
    fork.iterate(2)  # its first chunk landed, its resume is queued on the Encode side
    assert side.writes and fork.bridge.queue.get(1).resumes == 1  # type: ignore[union-attr]
    refused = fork.arrive(2, total=8, own_length=2, host=SLOW)
    fork.iterate(1, deliver=False)
    side.fail(2)  # one refused write: the session is poisoned on this Encode side
    assert side.failed_sessions == {session}
    later = [fork.arrive(room, total=total, own_length=2, host=SLOW) for room, total in ((3, 8), (4, 13))]
    prompt = fork.arrive(5, total=9, own_length=3)  # another Encode side: unaffected
    written = len(side.writes)
    for _ in range(5):
        fork.iterate(1)
        assert fork.bridge.allocator.fenced_count == 0  # every Failed came from the Encode side: no fence
    assert len(side.writes) == written  # the resume and both later requests: nothing written
    assert fork.scheduler.streamed == [resumed, refused, *later]
    for req in (resumed, refused, *later):
        assert "Failed to get embedding data" in aborted_with_500(req)
    dead = f"Language instance could be dead, remote mooncake session {session} is not alive"
    assert {room: side.failure_records[room] for room in (1, 3, 4)} == dict.fromkeys((1, 3, 4), dead)
    assert side.registrations == [session]  # registered once: nothing lifted the mark
    assert fork.scheduler.waiting_queue == [prompt] and delivered_mismatch(prompt, fork.source(prompt)) is None
    fork.scheduler.run_prefill()
    fork.assert_clean()

    fork.manager.lose_connection(f"{SLOW}:{PORT}")  # the heartbeat gave up: the address is asked for again
    again = fork.arrive(6, total=8, own_length=2, host=SLOW)
    fork.iterate(3)
    assert side.registrations == [session, session] and side.failed_sessions == set()
    assert fork.scheduler.waiting_queue == [again] and delivered_mismatch(again, fork.source(again)) is None
    fork.scheduler.run_prefill()
    fork.assert_clean()


def test_a_block_size_mismatch_ends_the_encode_workers_thread_and_the_deadlines_answer_and_unfence() -> None:
    """The fork's block-size check raises inside the transfer worker, which dies: no status is ever sent
    for the room, and the chunks queued behind it (the same session's) are never taken. Only the bridge's
    deadlines end it: the transfer deadline fails the requests, whose blocks stay fenced (nothing says
    the Encode side stopped) until the drain deadline."""
    fork = Fork(transfer_timeout_s=TRANSFER_TIMEOUT, drain_timeout_s=DRAIN)
    odd = ForkEncodeSide(f"{SLOW}:{PORT}", fork.network, 2 * B, H)  # its blocks hold 2B tokens, ours B
    fork.encode[SLOW] = odd
    first = fork.arrive(1, total=8, own_length=2, host=SLOW)
    fork.iterate(3)
    assert list(odd.dead_workers.values()) == [
        "RuntimeError: Transfer thread failed because of Block size mismatch: Embedding side uses 8"
    ]
    behind = fork.arrive(2, total=6, own_length=2, host=SLOW)  # the same session: the same dead queue
    prompt = fork.arrive(3, total=7, own_length=7)
    fork.iterate(3)
    assert odd.pending() == [2] and odd.writes == []  # room 1's chunk went down with the worker; 2's waits
    assert [room for room, _ in fork.manager.remote_log if room in (1, 2)] == []  # no status, ever
    assert fork.scheduler.waiting_queue == [prompt] and fork.scheduler.streamed == []
    fork.scheduler.run_prefill()
    held = {room: tuple(sorted(fork.bridge.queue.get(room).blocks)) for room in (1, 2)}  # type: ignore[union-attr]

    fork.clock.advance(TRANSFER_TIMEOUT + 1)
    fork.iterate(1)
    assert set(fork.scheduler.streamed) == {first, behind}
    assert all("TRANSFERRING for more than" in aborted_with_500(req) for req in (first, behind))
    assert fork.bridge.allocator.fences() == held
    fork.clock.advance(DRAIN - 1)
    fork.iterate(2)
    assert fork.bridge.allocator.fences() == held  # still nothing from the Encode side
    fork.clock.advance(2)
    fork.iterate(1)
    assert fork.bridge.allocator.fences() == {} and odd.writes == []
    assert fork.manager.request_status == {3: KVPoll.Success} and fork.manager.failure_records == {}
    fork.assert_clean()


def test_a_prompt_longer_than_its_expansion_is_answered_and_frees_everything() -> None:
    fork = Fork()
    req = fork.arrive(1, total=5, own_length=9)
    fork.iterate(3)
    assert fork.scheduler.waiting_queue == [] and fork.scheduler.streamed == [req]
    assert "SizeMismatch" in aborted_with_500(req) or "expansion" in aborted_with_500(req)
    fork.assert_clean()


ELSEWHERE = "10.0.0.7"  # an address no Encode side of the harness serves


@pytest.mark.parametrize("case", ["no server answers", "no Encode rank registered yet", "no such rank"])
def test_a_failed_bootstrap_is_answered_with_the_forks_record_and_holds_nothing(case: str) -> None:
    fork = Fork()
    address = f"{ELSEWHERE}:{PORT}"
    if case == "no server answers":
        fork.network.unreachable.add(address)
        record = f"Could not fetch embedding parallel info from bootstrap_addr: {address}"
    elif case == "no Encode rank registered yet":  # its sizes are None: int(None) raises inside the fetch
        fork.network.bootstrap_servers[address] = BootstrapServer()
        record = f"Could not fetch embedding parallel info from bootstrap_addr: {address}"
    else:  # an Encode rank filed under dp group 1; a tp-1 dp-1 Language rank asks for group 0
        ForkEncodeSide(address, fork.network, B, H, engine_rank=1)
        record = "Could not fetch bootstrap info for engine rank: 0 and target_dp_group: 0"
    req = Req("r1", [0], bootstrap_host=ELSEWHERE, bootstrap_room=1)
    fork.scheduler.process_input_requests([req])
    receiver = fork.entry(req).embedding_receiver.receiver
    assert not hasattr(receiver, "bootstrap_infos")  # the fork's constructor returned early
    assert fork.manager.request_status[1] == KVPoll.Failed and fork.manager.failure_records[1] == record
    fork.iterate(2)
    assert fork.scheduler.streamed == [req] and record in aborted_with_500(req)
    assert 1 not in fork.manager.request_status and 1 not in fork.manager.failure_records
    fork.assert_clean()


def test_a_receiver_that_cannot_be_built_is_answered_at_the_next_iteration() -> None:
    fork = Fork()

    def broken(req: Any) -> Any:
        raise OSError("bootstrap server unreachable")

    fork.bridge.receiver_factory = broken
    req = fork.arrive(1, total=8, own_length=1)
    assert fork.entry(req).embedding_receiver is None  # nothing the abort handler could reach
    fork.scheduler.abort_request("r1")
    fork.iterate(1)
    assert fork.scheduler.streamed == [req] and "unreachable" in aborted_with_500(req)
    fork.assert_clean()


# ---- aborts through the scheduler's own handler -----------------------------------------------------


def test_the_schedulers_abort_fails_the_request_and_fences_its_blocks_while_the_sender_may_write() -> None:
    fork = Fork()
    req = fork.arrive(1, total=8, own_length=2, host=SLOW)
    fork.iterate(2, deliver=False)
    entry = fork.entry(req)
    held = list(entry.embedding_indices or [])
    fork.scheduler.abort_request("r1")  # managers/scheduler.py:2652-2656: entry.embedding_receiver.abort()
    receiver = entry.embedding_receiver.receiver
    assert receiver.conclude_state == KVPoll.Failed  # the fork's receiver concluded Failed, locally
    assert fork.manager.failure_records[1] == "Aborted by AbortReq."
    assert fork.bridge.allocator.fences() == {1: tuple(sorted(held))}
    fork.iterate(1, deliver=False)
    assert fork.scheduler.streamed == [req] and "aborted" in aborted_with_500(req)
    fork.iterate(3, deliver=False)
    assert fork.bridge.allocator.fences() == {1: tuple(sorted(held))}  # its own Failed lifts nothing
    # the fork's queue would have popped the room's status and record when it reported the request; kept
    # while fenced, the status is where the Encode side's word arrives
    assert fork.manager.request_status[1] == KVPoll.WaitingForInput
    assert fork.manager.failure_records[1] == "Aborted by AbortReq."
    fork.encode[SLOW].run()  # the Encode side never heard of the abort: it writes, then says Success
    fork.iterate(1, deliver=False)
    assert 1 not in fork.manager.request_status and 1 not in fork.manager.failure_records  # retired: cleared
    fork.assert_clean()


def test_an_abort_before_the_first_allocation_is_answered_and_fences_nothing() -> None:
    fork = Fork(num_blocks=2)
    first = fork.arrive(1, total=8, own_length=1)
    waiting = fork.arrive(2, total=8, own_length=1)
    fork.iterate(1, deliver=False)
    fork.scheduler.abort_request("r2")  # still in the prealloc queue
    fork.iterate(1, deliver=False)
    assert fork.scheduler.streamed == [waiting] and fork.bridge.allocator.fenced_count == 0
    fork.iterate(2)
    assert fork.scheduler.waiting_queue == [first]


def test_a_warm_up_request_passes_through_and_its_receiver_has_no_abort() -> None:
    fork = Fork()
    req = fork.warmup(9)
    assert not hasattr(fork.entry(req).embedding_receiver.receiver, "abort")
    fork.iterate(3)
    assert fork.scheduler.waiting_queue == [req] and fork.bridge.allocator.free_count == N
