"""The Prometheus adapter: its families, their bounded labels, and their values after a scripted run."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.controller_bench import POOL, Bench, D
from support.fakes import FakeClock

from epd_receiver.adapters.ports.prometheus import PrometheusMetrics
from epd_receiver.fsm import KVPoll, State

P = "sglang:epd_receive_"


def scripted(metrics: PrometheusMetrics) -> Bench:
    """Room 1 resumes and succeeds; room 2 is aborted while resuming and fences 2 blocks until its sender
    acknowledges; room 3 times out bootstrapping. One second of the bench's clock between iterations."""
    clock = FakeClock()
    bench = Bench.make(clock=clock, metrics=metrics, bootstrap_timeout_s=5.0)
    bench.add(1)
    bench.step()
    clock.t += 1.0
    bench.land(1, 2 * D, KVPoll.Transferring)
    bench.step()  # room 1 RESUMING
    clock.t += 1.0
    bench.links[1].status = KVPoll.Success
    bench.step()
    bench.queue.release(1)
    bench.add(2)
    bench.step()
    bench.land(2, 2 * D, KVPoll.Transferring)
    bench.step()
    bench.queue.abort(2)
    bench.step()  # room 2 FAILED, fencing
    clock.t += 4.0
    bench.links[2].acknowledged = True
    bench.add(3, KVPoll.Bootstrapping)
    bench.step()  # the fence lifted
    clock.t += 6.0
    bench.step()  # room 3 timed out
    return bench


def test_a_scripted_run_is_counted_in_every_family() -> None:
    metrics = PrometheusMetrics(bytes_per_token=10)
    scripted(metrics)
    value = metrics.registry.get_sample_value
    assert value(P + "requests_total", {"outcome": "success"}) == 1
    assert value(P + "requests_total", {"outcome": "failed"}) == 2
    assert value(P + "failed_reqs_total", {"cause": "Aborted"}) == 1
    assert value(P + "failed_reqs_total", {"cause": "TimedOut"}) == 1
    assert value(P + "timeouts_total", {"state": "bootstrapping"}) == 1
    assert value(P + "tokens_total") == 2 * D + D  # room 2 had copied its first chunk out
    assert value(P + "bytes_total") == 10 * (2 * D + D)
    assert value(P + "resumes_total") == 2
    assert value(P + "rounds_total") == 4  # A0 and one resume each
    assert value(P + "fenced_blocks_total") == 2
    assert value(P + "fence_seconds_count") == 1 and value(P + "fence_seconds_sum") == 4.0
    assert value(P + "stage_seconds_count", {"stage": "receive"}) == 3
    assert value(P + "stage_seconds_sum", {"stage": "resume"}) == 1.0
    assert value(P + "stage_seconds_sum", {"stage": "first_chunk"}) == 1.0
    assert value(P + "stage_seconds_sum", {"stage": "bootstrap"}) == 6.0  # room 3's wait, as it left
    assert value(P + "pool_blocks", {"standing": "free"}) == POOL
    assert value(P + "pool_blocks", {"standing": "fenced"}) == 0
    assert value(P + "requests_in_state", {"state": "failed"}) == 0  # every request retired
    assert value(P + "rank_disagreements_total", {"what": "aux"}) is None  # one rank: never


def test_the_families_carry_bounded_labels_only() -> None:
    metrics = PrometheusMetrics()
    scripted(metrics)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    labels = {name for f in families.values() for s in f.samples for name in s.labels}
    assert labels <= {"stage", "outcome", "cause", "state", "what", "standing", "le"}
    stages = {s.labels["stage"] for s in families[P + "stage_seconds"].samples}
    assert stages == {"bootstrap", "waiting_for_a0", "first_chunk", "waiting_for_blocks", "resume", "receive"}
    states = {s.labels["state"] for s in families[P + "requests_in_state"].samples}
    assert states == {s.name.lower() for s in State}


def test_a_prefix_and_a_registry_of_the_hosts_own() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics("vllm:", registry=registry)
    assert metrics.registry is registry
    scripted(metrics)
    assert registry.get_sample_value("vllm:epd_receive_requests_total", {"outcome": "success"}) == 1
    assert registry.get_sample_value(P + "requests_total", {"outcome": "success"}) is None
    PrometheusMetrics()  # another queue's families in a registry of their own: no clash
