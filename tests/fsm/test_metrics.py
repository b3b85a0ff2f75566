"""The metrics port: fed at state changes, at a request's end and once per iteration, never by a quiet poll.

A scheduler polls every waiting request every iteration; a metrics call there would cost every waiting
receive on every iteration, and would count nothing, since a repeated status changes nothing.
"""

from __future__ import annotations

import pytest
from support.controller_bench import POOL, Bench, D
from support.fakes import FakeClock, RecordingMetrics

from epd_receiver.fsm import KVPoll, NoMetrics, ReceiverQueue, State, TimedOut

ROOM = 1


def resuming(metrics: RecordingMetrics, clock: FakeClock) -> Bench:
    """A bench whose one request is RESUMING (its sender reports no progress), one second per stage."""
    bench = Bench.make(clock=clock, metrics=metrics)
    bench.add(ROOM)
    clock.t += 1.0
    bench.step()  # BOOTSTRAPPING -> WAITING_FOR_INPUT -> TRANSFERRING
    clock.t += 1.0
    bench.land(ROOM, 2 * D, KVPoll.Transferring)
    bench.step()  # the first chunk copied out; the remainder granted: RESUMING
    assert bench.queue.get(ROOM).state is State.RESUMING  # type: ignore[union-attr]
    return bench


def test_the_quiet_poll_calls_no_metrics_method() -> None:
    metrics, clock = RecordingMetrics(), FakeClock()
    bench = resuming(metrics, clock)
    metrics.calls.clear()
    bench.step(5)  # Transferring again and again in RESUMING: nothing changes
    assert [name for name, _ in metrics.calls] == ["iteration"] * 5


def test_stage_seconds_and_the_end_are_reported_on_the_queues_clock() -> None:
    metrics, clock = RecordingMetrics(), FakeClock()
    bench = resuming(metrics, clock)
    request = bench.queue.get(ROOM)
    assert request is not None
    clock.t += 2.5
    bench.links[ROOM].status = KVPoll.Success
    [ended] = bench.step()
    assert ended is request and request.state is State.SUCCESS
    assert request.stage_seconds == {
        "BOOTSTRAPPING": 1.0,
        "WAITING_FOR_INPUT": 0.0,
        "TRANSFERRING": 1.0,
        "WAITING_FOR_BLOCKS": 0.0,
        "RESUMING": 2.5,
    }
    assert (State.SUCCESS, State.RESUMING, 2.5) in metrics.named("entered")
    assert metrics.named("ended") == [(State.SUCCESS, None, None, 4.5, 2 * D, 1)]
    requests, free, owned, fenced = metrics.named("iteration")[-1]
    assert requests[State.SUCCESS] == 1 and sum(requests.values()) == 1
    assert (free, owned, fenced) == (POOL - 2, 2, 0)


def test_a_fence_is_reported_when_set_and_when_lifted_with_how_long_it_lasted() -> None:
    metrics, clock = RecordingMetrics(), FakeClock()
    bench = resuming(metrics, clock)
    bench.queue.abort(ROOM)  # the sender may still write the remainder: its blocks are fenced
    bench.step()
    assert metrics.named("fenced") == [(2,)]
    assert metrics.named("ended") == [(State.FAILED, "Aborted", State.RESUMING, 2.0, D, 1)]
    assert metrics.named("iteration")[-1][1:] == (POOL - 2, 0, 2)
    clock.t += 3.0
    bench.links[ROOM].acknowledged = True
    bench.step()
    assert metrics.named("fence_lifted") == [(2, 3.0)]
    assert metrics.named("iteration")[-1][1:] == (POOL, 0, 0)
    assert len(metrics.named("ended")) == 1  # a fence lifted later ends nothing twice


def test_a_timeout_names_the_state_it_waited_in() -> None:
    metrics, clock = RecordingMetrics(), FakeClock()
    bench = Bench.make(clock=clock, metrics=metrics, bootstrap_timeout_s=5.0)
    bench.add(ROOM, KVPoll.Bootstrapping)
    bench.step()
    clock.t += 6.0
    [ended] = bench.step()
    assert isinstance(ended.error, TimedOut)
    assert metrics.named("ended") == [(State.FAILED, "TimedOut", State.BOOTSTRAPPING, 6.0, 0, 0)]


@pytest.mark.parametrize("metrics", [None, NoMetrics()])
def test_without_metrics_the_queue_counts_no_gauges(metrics: NoMetrics | None) -> None:
    bench = Bench.make(metrics=metrics)
    assert isinstance(bench.queue, ReceiverQueue)
    assert bench.queue._gauged is False
