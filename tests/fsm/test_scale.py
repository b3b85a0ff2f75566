"""What keeps a quiet iteration to its polls and an admission, a release or a state change to its own work,
however many requests are in flight: the Machine binds nothing onto a request, it indexes its models by
state as they change, and the queue asks that index instead of walking every request.

Costs are counted in calls (the interpreter's profile hook), never timed: the counts at two sizes must be
equal per request, or equal outright.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import pytest
from support.controller_bench import Bench, D
from support.fakes import FakeLink

from epd_receiver.adapters.kit import walk as walk_module
from epd_receiver.adapters.kit.replicas import ReplicaWorld
from epd_receiver.fsm import KVPoll, ReceiverQueue, State
from epd_receiver.fsm.machine import Members
from epd_receiver.fsm.request import ReceiverRequest


def queue_of(n: int) -> Bench:
    """``n`` requests in TRANSFERRING (A0 granted, init sent), whose polls change nothing."""
    bench = Bench.make(num_blocks=2 * n + 4)
    for room in range(n):
        bench.add(room)
    bench.step(2)
    assert all(r.state is State.TRANSFERRING for r in bench.queue)
    return bench


def calls(action: Callable[[], object]) -> int:
    """Python and C function calls that ``action`` makes."""
    count = 0

    def hook(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(hook)
    try:
        action()
    finally:
        sys.setprofile(None)
    return count


def index_agrees(queue: ReceiverQueue[Any]) -> None:
    """The Machine's index says what a walk over every request would."""
    machine = queue._machine
    members = list(machine.models)
    assert sorted(map(id, members)) == sorted(map(id, queue)), "the Machine holds exactly the queue's requests"
    for state in State:
        assert machine.in_state(state) == [r for r in members if r.state is state], state
    terminal = queue.spec.terminal
    live_ended = [r for r in queue._live.values() if r.state in terminal]
    assert [id(r) for r in machine.settled()] == [id(r) for r in live_ended], "settled: the live terminal ones"
    if queue._polled_at == queue._members and not machine.has_settled:
        expected = [*(r for r in queue._live.values()), *queue._fenced.values()]
        assert [id(r) for r in queue._polled] == [id(r) for r in expected], "the list of polled requests"


# ---- nothing per instance ---------------------------------------------------------------------------------


def test_admission_binds_nothing_onto_the_request() -> None:
    queue = queue_of(3).queue
    request = queue.add(99, FakeLink())
    bound = getattr(request, "__dict__", {})
    assert not [value for value in bound.values() if isinstance(value, functools.partial)]
    for name in [*queue._machine.events, "trigger", "may_trigger", *(f"is_{s.name}" for s in State)]:
        assert name not in bound, name
    assert request.trigger == ReceiverRequest.trigger.__get__(request)  # the class's own, found by name
    assert request in queue._machine.models


def test_members_read_like_the_list_they_replace_and_survive_a_copy() -> None:
    import copy

    members = Members()
    a, b = object(), object()
    members.append(a)
    members.append(b)
    assert members == [a, b] and a in members and object() not in members and members[1] is b
    members.remove(a)
    assert members == [b] and len(members) == 1
    with pytest.raises(ValueError, match="not a model"):
        members.remove(a)
    copied = copy.deepcopy([members, b])
    assert copied[1] in copied[0] and b not in copied[0]


# ---- constant work ----------------------------------------------------------------------------------------


def test_add_and_release_make_as_many_calls_at_any_size() -> None:
    counts = []
    for n in (20, 400):
        bench = queue_of(n)
        queue = bench.queue
        bench.land(0, D, KVPoll.Success)
        bench.step()
        added = calls(lambda queue=queue, n=n: queue.add(n, FakeLink()))
        released = calls(lambda queue=queue: queue.release(0))
        counts.append((added, released))
    assert counts[0] == counts[1]


def test_a_quiet_iteration_makes_the_same_calls_per_request_at_any_size() -> None:
    """A constant for the iteration, then as many calls for each request polled: linear, no more."""
    counts = {}
    for n in (20, 40, 400):
        queue = queue_of(n).queue
        queue.step()
        counts[n] = calls(queue.step)
    per_request = (counts[40] - counts[20]) / 20
    assert per_request > 0 and counts[400] - counts[20] == per_request * 380


def test_a_state_change_adds_as_many_calls_at_any_size() -> None:
    """The step in which one request succeeds and the next, over two quiet ones: the same extra calls with
    20 in flight and with 400, so neither the allocation pass, the collection nor the list of polled
    requests walks the others."""
    extra = []
    for n in (20, 400):
        bench = queue_of(n)
        queue = bench.queue
        queue.step()
        quiet = calls(queue.step)
        bench.land(n // 2, D, KVPoll.Success)
        changed = calls(lambda queue=queue: (queue.step(), queue.step()))
        assert queue.get(n // 2) is not None and queue.get(n // 2).state is State.SUCCESS  # type: ignore[union-attr]
        extra.append(changed - 2 * quiet)
    assert extra[0] == extra[1]


def test_the_allocation_pass_serves_the_waiting_in_arrival_order_whatever_order_they_began_to_wait() -> None:
    bench = Bench.make(num_blocks=4)  # room for two A0s
    for room in range(4):
        bench.add(room, KVPoll.Bootstrapping)
    bench.step()
    for room in (3, 1, 2, 0):  # the handshakes end in another order than the arrivals
        bench.links[room].status = KVPoll.WaitingForInput
        bench.step()
        index_agrees(bench.queue)
    granted = {r.room for r in bench.queue if r.state is State.TRANSFERRING}
    assert granted == {3, 1}  # each served as soon as it waited, while blocks were free
    for room in (3, 1):  # their payloads fit A0: done, and released, their blocks go to the next in line
        bench.land(room, D, KVPoll.Success)
    bench.step()
    bench.queue.release(3)
    bench.step()
    assert [r.room for r in bench.queue if r.state is State.TRANSFERRING] == [0]  # arrived before room 2
    bench.queue.release(1)
    bench.step()
    assert {r.room for r in bench.queue if r.state is State.TRANSFERRING} == {0, 2}
    index_agrees(bench.queue)


# ---- the index against a walk ------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_index_agrees_with_the_states_along_a_random_walk(ranks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    judged = walk_module._Run._judged
    checked = [0]

    def judged_and_indexed(self: Any, accepted: bool | None, method: str) -> bool:
        world = self.world
        for rank in world.ranks if isinstance(world, ReplicaWorld) else [world]:
            index_agrees(rank.queue)
        checked[0] += 1
        return judged(self, accepted, method)

    monkeypatch.setattr(walk_module._Run, "_judged", judged_and_indexed)
    result = walk_module.walk(1500, seed=ranks, ranks=ranks)
    assert result.clean, result.violation
    assert checked[0] >= 1500
