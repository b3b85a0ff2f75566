"""The controller's metrics through vLLM's own stats path, into the ``vllm:`` Prometheus families.

vLLM's scheduler runs in the engine-core process, while Prometheus is served by the front end. So the
controller's reports (``fsm.ReceiverMetrics``) are recorded as plain tuples in the scheduler process
(``RecordingMetrics``), handed over each step by ``get_ec_connector_stats`` (vllm/v1/core/sched/
scheduler.py:2606-2620), carried in ``SchedulerStats`` as a plain dict, rebuilt by vLLM's ``ECConnectorLogging``
through ``build_ec_connector_stats``, and replayed in the front end by the ``ECConnectorPromMetrics`` that
``build_prom_metrics`` returns into ``PrometheusMetrics(prefix="vllm:")``, the families the README's Metrics
table lists, in ``prometheus_client.REGISTRY`` (the registry vLLM serves).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import prometheus_client
from vllm.distributed.ec_transfer.ec_connector.metrics import ECConnectorPromMetrics, ECConnectorStats

from epd_receiver.adapters.ports.prometheus import PrometheusMetrics
from epd_receiver.fsm import State

__all__ = ["PrometheusReplay", "ReceiveStats", "RecordingMetrics", "prometheus_metrics"]

EVENTS = "events"
GAUGES = "gauges"


class RecordingMetrics:
    """``fsm.ReceiverMetrics`` kept as serialisable tuples until the next ``take``; the gauges only as last set."""

    def __init__(self) -> None:
        self._events: list[list[Any]] = []
        self._gauges: list[Any] | None = None

    def entered(self, state: State, left: State, seconds: float) -> None:
        self._events.append(["entered", state.name, left.name, seconds])

    def ended(
        self, outcome: State, cause: str | None, failed_in: State | None, seconds: float, tokens: int, resumes: int
    ) -> None:
        failed = None if failed_in is None else failed_in.name
        self._events.append(["ended", outcome.name, cause, failed, seconds, tokens, resumes])

    def fenced(self, blocks: int) -> None:
        self._events.append(["fenced", blocks])

    def fence_lifted(self, blocks: int, seconds: float) -> None:
        self._events.append(["fence_lifted", blocks, seconds])

    def rank_disagreement(self, what: str) -> None:
        self._events.append(["rank_disagreement", what])

    def iteration(self, requests: Mapping[State, int], free: int, owned: int, fenced: int) -> None:
        self._gauges = [{state.name: count for state, count in requests.items()}, free, owned, fenced]

    def take(self) -> ReceiveStats | None:
        """What was recorded since the last call, as vLLM's stats object; None when nothing was."""
        if not self._events and self._gauges is None:
            return None
        data: dict[str, Any] = {EVENTS: self._events, GAUGES: self._gauges}
        self._events, self._gauges = [], None
        return ReceiveStats(data)


class ReceiveStats(ECConnectorStats):
    """vLLM's stats container over the recorded reports; aggregation keeps every event and the last gauges."""

    def reset(self) -> None:
        self.data = {EVENTS: [], GAUGES: None}

    def aggregate(self, other: ECConnectorStats) -> ReceiveStats:
        later = other.data
        return ReceiveStats(
            {
                EVENTS: list(self.data.get(EVENTS) or []) + list(later.get(EVENTS) or []),
                GAUGES: later.get(GAUGES) if later.get(GAUGES) is not None else self.data.get(GAUGES),
            }
        )

    def reduce(self) -> dict[str, int | float]:
        """What vLLM's periodic log line prints: receives ended by outcome, tokens, resumes, fences."""
        ended = [e for e in self.data.get(EVENTS) or [] if e[0] == "ended"]
        return {
            "succeeded": sum(1 for e in ended if e[1] == State.SUCCESS.name),
            "failed": sum(1 for e in ended if e[1] != State.SUCCESS.name),
            "tokens": sum(int(e[5]) for e in ended),
            "resumes": sum(int(e[6]) for e in ended),
            "fenced_blocks": sum(int(e[1]) for e in self.data.get(EVENTS) or [] if e[0] == "fenced"),
        }

    def is_empty(self) -> bool:
        return not self.data.get(EVENTS) and self.data.get(GAUGES) is None


def replay(data: Mapping[str, Any], into: PrometheusMetrics) -> None:
    """Feed recorded reports into the Prometheus families, as the controller would have fed them directly."""
    for event in data.get(EVENTS) or []:
        kind, args = event[0], event[1:]
        if kind == "entered":
            into.entered(State[args[0]], State[args[1]], float(args[2]))
        elif kind == "ended":
            failed_in = None if args[2] is None else State[args[2]]
            into.ended(State[args[0]], args[1], failed_in, float(args[3]), int(args[4]), int(args[5]))
        elif kind == "fenced":
            into.fenced(int(args[0]))
        elif kind == "fence_lifted":
            into.fence_lifted(int(args[0]), float(args[1]))
        elif kind == "rank_disagreement":
            into.rank_disagreement(str(args[0]))
    gauges = data.get(GAUGES)
    if gauges is not None:
        counts, free, owned, fenced = gauges
        into.iteration({State[name]: count for name, count in counts.items()}, free, owned, fenced)


_FAMILIES: dict[int, PrometheusMetrics] = {}


def prometheus_metrics(registry: prometheus_client.CollectorRegistry, bytes_per_token: int) -> PrometheusMetrics:
    """The ``vllm:`` families in ``registry``, made once: a registry refuses a family registered twice."""
    families = _FAMILIES.get(id(registry))
    if families is None:
        families = _FAMILIES[id(registry)] = PrometheusMetrics(
            prefix="vllm:", registry=registry, bytes_per_token=bytes_per_token
        )
    return families


class PrometheusReplay(ECConnectorPromMetrics):
    """What ``build_prom_metrics`` returns: vLLM's front end calls ``observe`` with each step's stats data.

    The families are the project's own (``adapters/ports/prometheus.py``) with bounded labels of their own; vLLM's
    per-engine labels and metric classes are not used, so several engines in one front end add up.
    """

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
        *,
        registry: prometheus_client.CollectorRegistry | None = None,
        bytes_per_token: int = 0,
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.families = prometheus_metrics(registry or prometheus_client.REGISTRY, bytes_per_token)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        replay(transfer_stats_data, self.families)
