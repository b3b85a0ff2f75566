"""The metrics port on ``prometheus_client``: what a serving team scrapes from the Language side's receive.

Neither SGLang nor vLLM exposes the Language side of an embedding receive, so the families follow their
conventions: SGLang's ``sglang:`` prefix by default (as ``sglang:kv_transfer_latency_ms``), ``vllm:`` for
a vLLM host (``PrometheusMetrics(prefix="vllm:")``). Every label is bounded: a stage, a state, or an
error class name; never a room. Late writes landing in a fence are not counted here: only the kit's
judge, which watches the pool, can see them.

The families live in the ``registry`` given (a new ``CollectorRegistry`` by default, so that two queues
in one process, or a test, never collide); a host passes its own to serve them with its other metrics.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from epd_receiver.fsm import State

# The stage each state's time is reported under; "receive" is the whole, from arrival to the end.
STAGES: Mapping[State, str] = {
    State.BOOTSTRAPPING: "bootstrap",
    State.WAITING_FOR_INPUT: "waiting_for_a0",
    State.TRANSFERRING: "first_chunk",
    State.WAITING_FOR_BLOCKS: "waiting_for_blocks",
    State.RESUMING: "resume",
}
WHOLE = "receive"

# Seconds, from a loopback transfer to a sender that stalls for its deadline.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class PrometheusMetrics:
    """``ReceiverMetrics`` as Prometheus families; ``bytes_per_token`` turns tokens landed into bytes
    (``payload.token_bytes``; 0 counts no bytes)."""

    def __init__(
        self,
        prefix: str = "sglang:",
        *,
        registry: CollectorRegistry | None = None,
        bytes_per_token: int = 0,
    ) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self.prefix = prefix
        self._bytes_per_token = bytes_per_token
        r, p = self.registry, prefix + "epd_receive_"
        self.stage_seconds = Histogram(
            p + "stage_seconds",
            "Seconds a receive spent in a stage (bootstrap, waiting_for_a0, first_chunk, waiting_for_blocks, "
            "resume, per visit) or in all (receive, per request)",
            ["stage"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.requests = Counter(p + "requests", "Receives that ended, by outcome", ["outcome"], registry=r)
        self.bytes = Counter(p + "bytes", "Bytes of embeddings received by receives that ended", registry=r)
        self.tokens = Counter(p + "tokens", "Tokens of embeddings received by receives that ended", registry=r)
        self.resumes = Counter(p + "resumes", "Resumes sent: a remainder asked for into new blocks", registry=r)
        self.rounds = Counter(p + "rounds", "Allocations a receive was granted and filled (A0 and resumes)", registry=r)
        self.failures = Counter(p + "failed_reqs", "Receives that failed, by error class", ["cause"], registry=r)
        self.timeouts = Counter(
            p + "timeouts", "Receives that timed out, by the state they waited in", ["state"], registry=r
        )
        self.fenced_blocks = Counter(
            p + "fenced_blocks",
            "Blocks fenced after a failure: kept from the pool while a sender may write",
            registry=r,
        )
        self.fence_seconds = Histogram(
            p + "fence_seconds", "Seconds a fence lasted until its sender stopped or was presumed gone",
            registry=r, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.disagreements = Counter(
            p + "rank_disagreements", "Times the tensor-parallel ranks disagreed, by what", ["what"], registry=r
        )
        self.in_state = Gauge(p + "requests_in_state", "Receives in each state now", ["state"], registry=r)
        self.blocks = Gauge(p + "pool_blocks", "The receive pool's blocks by standing", ["standing"], registry=r)

    # ---- ReceiverMetrics -------------------------------------------------------------------------

    def entered(self, state: State, left: State, seconds: float) -> None:
        stage = STAGES.get(left)
        if stage is not None:
            self.stage_seconds.labels(stage).observe(seconds)
        if state is State.TRANSFERRING or state is State.RESUMING:
            self.rounds.inc()

    def ended(
        self, outcome: State, cause: str | None, failed_in: State | None, seconds: float, tokens: int, resumes: int
    ) -> None:
        self.requests.labels(outcome.name.lower()).inc()
        self.stage_seconds.labels(WHOLE).observe(seconds)
        self.tokens.inc(tokens)
        self.resumes.inc(resumes)
        self.bytes.inc(tokens * self._bytes_per_token)
        if cause is not None:
            self.failures.labels(cause).inc()
            if cause == "TimedOut" and failed_in is not None:
                self.timeouts.labels(failed_in.name.lower()).inc()

    def fenced(self, blocks: int) -> None:
        self.fenced_blocks.inc(blocks)

    def fence_lifted(self, blocks: int, seconds: float) -> None:
        self.fence_seconds.observe(seconds)

    def rank_disagreement(self, what: str) -> None:
        self.disagreements.labels(what).inc()

    def iteration(self, requests: Mapping[State, int], free: int, owned: int, fenced: int) -> None:
        for state, count in requests.items():
            self.in_state.labels(state.name.lower()).set(count)
        self.blocks.labels("free").set(free)
        self.blocks.labels("owned").set(owned)
        self.blocks.labels("fenced").set(fenced)
