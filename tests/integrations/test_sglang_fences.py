"""Fences under the SGLang bridge: lifted only on the Encode side's word or at the drain deadline.

The link's evidence that the Encode side stopped is only what that side reported; the fork's loop with
late writes (aborts, a deadline, sender and heartbeat failures, a drain) fences every late write and
catches a link that takes its own Failed as the sender's word; two tensor-parallel ranks over the
scheduler's gloo group lift a fence only when both senders stopped. The harness is ``sglang_bridge_bench.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from support.sglang_bridge_bench import (
    BROKEN,
    DRAIN,
    FAST,
    PORT,
    SLOW,
    TRANSFER_TIMEOUT,
    B,
    Fork,
    H,
    aborted_with_500,
    delivered_mismatch,
)
from support.sglang_fork_encode import EncodeSide as ForkEncodeSide
from support.sglang_fork_receiver import FakeKVReceiver, LanguageManager, MooncakeEmbeddingReceiver, Network
from support.sglang_fork_scheduler import Req

from epd_receiver.adapters.integrations.sglang.link import ReceiverLink, remote_evidence
from epd_receiver.adapters.ports.ranks import GlooRankGroup, RankContext, RankProcesses
from epd_receiver.fsm import KVPoll

# ---- the link's evidence that the Encode side stopped -----------------------------------------------


class _Table:
    """A manager's table alone, for the evidence rules."""

    def __init__(self) -> None:
        self.network = Network()
        self.manager = LanguageManager(self.network, ([0] * 4, [0] * 4, [B * H * 2, B * 4, 3 * B * 4, 64]))
        ForkEncodeSide(f"{SLOW}:{PORT}", self.network, B, H)  # registered with its bootstrap server

    def receiver(self, room: int, address: str = f"{SLOW}:{PORT}") -> MooncakeEmbeddingReceiver:
        return MooncakeEmbeddingReceiver(self.manager, address, room)


def test_only_what_the_encode_side_reported_counts_as_evidence() -> None:
    t = _Table()
    m = t.manager
    cases = {
        "success": (1, lambda: m.on_status_message(1, KVPoll.Success), True),
        "remote failure": (2, lambda: m.on_status_message(2, KVPoll.Failed), True),
        "transferring": (3, lambda: m.on_status_message(3, KVPoll.Transferring), False),
        "heartbeat": (4, lambda: m.lose_connection(f"{SLOW}:{PORT}"), False),
        "nothing yet": (5, lambda: None, False),
    }
    for name, (room, event, expected) in cases.items():
        t.receiver(room)
        assert m.request_status[room] == KVPoll.WaitingForInput, name
        event()
        assert remote_evidence(m, room) is expected, name
    assert remote_evidence(m, 99) is False  # no entry at all
    t.network.unreachable.add(f"{BROKEN}:{PORT}")
    t.receiver(6, f"{BROKEN}:{PORT}")  # a failed bootstrap sets Failed on this side alone
    assert m.request_status[6] == KVPoll.Failed and remote_evidence(m, 6) is False


def test_the_links_own_abort_is_never_evidence_but_a_later_remote_status_is() -> None:
    t = _Table()
    receiver = t.receiver(1)
    link = ReceiverLink(receiver, room=1)
    link.abort()
    assert link.poll() == KVPoll.Failed and link.writes_stopped() is False  # poll() says Failed; we know better
    t.manager.lose_connection(f"{SLOW}:{PORT}")  # then a heartbeat Failed, and the abort record after it
    receiver.abort()
    assert link.writes_stopped() is False
    t.manager.on_status_message(1, KVPoll.Success)  # the Encode side finished its write after all
    assert link.writes_stopped() is True


def test_evidence_is_latched_before_failure_exception_pops_it() -> None:
    t = _Table()
    link = ReceiverLink(t.receiver(1), room=1)
    t.manager.on_status_message(1, KVPoll.Failed)
    assert link.poll() == KVPoll.Failed
    assert "Failed to get embedding data" in (link.failure_reason() or "")
    assert 1 not in t.manager.request_status  # popped by failure_exception()
    assert link.writes_stopped() is True


def test_a_warm_up_link_has_stopped_from_the_start_and_a_plain_receiver_never_has() -> None:
    assert ReceiverLink(FakeKVReceiver(None, "x"), room=1, writes_nothing=True).writes_stopped() is True
    assert ReceiverLink(FakeKVReceiver(None, "x"), room=1).writes_stopped() is False


# ---- the scheduler loop with late writes: abort, deadline, failures, success, release ---------------


class PollTrustingLink(ReceiverLink):
    """The old reading, kept to show what the loop test catches: a terminal poll() taken as evidence,
    though the fork's receiver reports Failed after its own abort (or a lost heartbeat)."""

    def writes_stopped(self) -> bool:
        return int(self.receiver.poll()) in (KVPoll.Failed, KVPoll.Success)


@dataclass
class Story:
    """One run of the loop test: what was delivered wrong, fences lifted without cause, who was answered."""

    fork: Fork
    corrupted: dict[str, str] = field(default_factory=dict)
    premature_lifts: list[int] = field(default_factory=list)
    lifted_by: dict[int, str] = field(default_factory=dict)
    fenced_at: dict[int, float] = field(default_factory=dict)
    failed_at_turn: dict[int, int] = field(default_factory=dict)
    late_writes: list[tuple[int, int]] = field(default_factory=list)
    turn: int = 0

    def iterate(self, times: int = 1) -> None:
        """The prompt Encode side writes first; the slow side writes a failed room's queued chunk in the
        turn after the room was answered, after every prompt write of that turn (so it lands last)."""
        for _ in range(times):
            self.turn += 1
            self.fork.encode[FAST].run()
            slow = self.fork.encode[SLOW]
            for room in slow.pending():
                if self.turn > self.failed_at_turn.get(room, 1 << 30):
                    before = len(slow.writes)
                    slow.transfer(room)
                    self.late_writes += slow.writes[before:]
            fences = dict(self.fork.bridge.allocator.fences())
            streamed = len(self.fork.scheduler.streamed)
            self.fork.scheduler.process_multimodal_language_queue()
            for req in self.fork.scheduler.streamed[streamed:]:
                self.failed_at_turn[req.bootstrap_room] = self.turn
            self._judge(fences)
            self._prefill()

    def _judge(self, before: dict[int, tuple[int, ...]]) -> None:
        now = self.fork.clock.now()
        after = self.fork.bridge.allocator.fences()
        for room in after:
            self.fenced_at.setdefault(room, now)
        for room in set(before) - set(after):
            if self.fork.manager.remote_terminal(room):
                self.lifted_by[room] = "remote status"
            elif now - self.fenced_at.get(room, now) >= DRAIN:
                self.lifted_by[room] = "drain deadline"
            else:
                self.premature_lifts.append(room)

    def _prefill(self) -> None:
        for req in self.fork.scheduler.waiting_queue:
            problem = delivered_mismatch(req, self.fork.source(req)) if req.input_embeds is not None else None
            if problem is not None:
                self.corrupted[req.rid] = problem
        self.fork.scheduler.run_prefill()

    def until(self, done: Callable[[], bool], limit: int = 12) -> None:
        for _ in range(limit):
            if done():
                return
            self.iterate()
        raise AssertionError("the loop did not get there")


def run_story(link_factory: Callable[..., Any]) -> tuple[Story, dict[str, Req]]:
    """A pool of one A0 (two blocks), so that every lifted block goes straight to the next request.

    abort: A is aborted through the scheduler while its chunk is queued on the slow side;
    deadline: B's Encode side is silent past the transfer deadline;
    sender failure: C's Encode side (an instance of its own: from then on it fails the session's every
    chunk) reports Failed;
    heartbeat: the manager loses the slow side's heartbeat while D transfers (Failed on this side only);
    drain: E is aborted, its late chunk is partial (Transferring, not terminal), so only the drain
    deadline ends its fence;
    after each, a prompt request takes the blocks; the last one (R) resumes and completes.
    """
    fork = Fork(num_blocks=2, link_factory=link_factory, transfer_timeout_s=TRANSFER_TIMEOUT, drain_timeout_s=DRAIN)
    story = Story(fork)
    s, reqs = fork.scheduler, {}

    def transferring(room: int) -> Callable[[], bool]:
        return lambda: fork.bridge.queue.get(room) is not None and bool(fork.bridge.queue.get(room).blocks)  # type: ignore[union-attr]

    def answered(req: Req) -> Callable[[], bool]:
        return lambda: req in s.streamed or req.input_embeds is not None

    reqs["A"] = fork.arrive(10, total=8, own_length=2, host=SLOW)
    story.until(transferring(10))
    s.abort_request("r10")
    reqs["a"] = fork.arrive(11, total=8, own_length=3)
    story.until(answered(reqs["a"]))

    reqs["B"] = fork.arrive(20, total=8, own_length=2, host=SLOW)
    story.until(transferring(20))
    fork.clock.advance(TRANSFER_TIMEOUT + 1)
    reqs["b"] = fork.arrive(21, total=7, own_length=7)
    story.until(answered(reqs["b"]))

    reqs["C"] = fork.arrive(30, total=8, own_length=2, host=BROKEN)
    story.until(transferring(30))
    fork.encode[BROKEN].fail(30)
    reqs["c"] = fork.arrive(31, total=6, own_length=1)
    story.until(answered(reqs["c"]))

    reqs["D"] = fork.arrive(40, total=8, own_length=2, host=SLOW)
    story.until(transferring(40))
    fork.manager.lose_connection(f"{SLOW}:{PORT}")
    reqs["d"] = fork.arrive(41, total=8, own_length=8)
    story.until(answered(reqs["d"]))

    reqs["E"] = fork.arrive(50, total=12, own_length=2, host=SLOW)
    story.until(transferring(50))
    s.abort_request("r50")
    reqs["e"] = fork.arrive(51, total=8, own_length=4)
    story.iterate(4)
    fork.clock.advance(DRAIN + 1)
    story.until(answered(reqs["e"]))

    reqs["R"] = fork.arrive(60, total=13, own_length=3)  # A0, then a resume of one block
    story.until(answered(reqs["R"]))
    story.iterate(2)
    return story, reqs


def test_the_fork_loop_fences_every_late_write_and_lifts_only_on_the_encode_sides_word_or_the_drain() -> None:
    story, reqs = run_story(ReceiverLink)
    fork = story.fork
    assert story.corrupted == {} and story.premature_lifts == []
    for name in "abcdeR":
        assert reqs[name] not in fork.scheduler.streamed, name  # every prompt request was delivered, intact
    answers = {name: aborted_with_500(reqs[name]) for name in "ABCDE"}
    assert "aborted" in answers["A"] and "aborted" in answers["E"]
    assert "TRANSFERRING for more than" in answers["B"]
    assert "Failed to get embedding data" in answers["C"] and "Losing connection" in answers["D"]
    # every fenced block took a late write, and each fence ended for a reason the Encode side gave
    late_rooms = {room for room, _ in story.late_writes}
    assert late_rooms == {10, 20, 40, 50}
    assert story.lifted_by == {10: "remote status", 20: "remote status", 40: "remote status", 50: "drain deadline"}
    assert 30 not in story.fenced_at  # a sender that reported Failed fences nothing
    fork.assert_clean()


def test_retired_rooms_leave_the_forks_tables_as_its_own_queue_leaves_them() -> None:
    """After aborts, a timeout, sender and heartbeat failures and a drain, every failed room is gone from
    the fork's manager (status and failure record), as the fork's queue pops them through
    ``failure_exception()``; the bridge does it once the room is retired, so late statuses that arrived
    while it was fenced are gone too. What stays is what the fork also leaves: the Success entry of
    every delivered room, which its queue never clears."""
    story, reqs = run_story(ReceiverLink)
    manager = story.fork.manager
    delivered = {reqs[name].bootstrap_room for name in "abcdeR"}
    assert manager.request_status == dict.fromkeys(delivered, KVPoll.Success)
    assert manager.failure_records == {}
    story.fork.assert_clean()


def test_the_same_loop_catches_a_link_that_takes_its_own_failed_as_the_senders_word() -> None:
    story, reqs = run_story(PollTrustingLink)
    assert set(story.premature_lifts) >= {10, 50}  # lifted at once after the local abort
    # the late writes of A (aborted) and D (heartbeat lost, so never fenced) land in a and d's payloads
    assert set(story.corrupted) >= {"r11", "r41"}
    assert reqs["e"] in story.fork.scheduler.streamed  # E's late aux row made e's own transfer look impossible


# ---- tensor-parallel ranks over the scheduler's gloo group ------------------------------------------


def two_rank_job(context: RankContext, late_on_this_rank_first: bool) -> dict[str, Any]:
    """Both ranks run the same loop over their own pool; the aborted room's Encode side answers one rank
    before the other. The same iteration count on both ranks: every iteration is a collective."""
    fork = Fork(num_blocks=2, group=dist.group.WORLD)
    aborted = fork.arrive(10, total=8, own_length=2, host=SLOW)
    fork.iterate(2, deliver=False)
    fork.scheduler.abort_request("r10")  # an AbortReq reaches every rank
    fork.iterate(1, deliver=False)
    if late_on_this_rank_first:
        fork.encode[SLOW].run()  # a late write into this rank's fence, then Success to this rank only
    fork.iterate(2, deliver=False)
    fenced_while_one_rank_waits = fork.bridge.allocator.fenced_count
    if not late_on_this_rank_first:
        fork.encode[SLOW].run()
    fork.iterate(1, deliver=False)
    fenced_after = fork.bridge.allocator.fenced_count
    prompt = fork.arrive(11, total=12, own_length=3)  # A0, then a resume into one block
    fork.iterate(5)
    return {
        "ranks": fork.bridge.queue.rank_count,
        "gloo": isinstance(fork.bridge.queue._ranks, GlooRankGroup),
        "aborted": aborted in fork.scheduler.streamed,
        "fenced": (fenced_while_one_rank_waits, fenced_after),
        "delivered": prompt in fork.scheduler.waiting_queue and delivered_mismatch(prompt, fork.source(prompt)) is None,
    }


def test_two_ranks_reduce_over_the_schedulers_gloo_group_and_lift_a_fence_only_when_both_senders_stopped() -> None:
    with RankProcesses(2) as ranks:
        answers = ranks.run_each(two_rank_job, [(True,), (False,)], timeout_s=120)
    expected = {"ranks": 2, "gloo": True, "aborted": True, "fenced": (2, 0), "delivered": True}
    assert answers == [expected, expected]
