"""What ``epd-receiver bench`` measures with: the sizes of its cases and how often it repeats them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BenchConfig:
    in_flight: int = 1000  # requests polled per scheduler iteration
    poll_iterations: int = 200
    lifecycles: int = 1000  # requests driven through a whole resumed life for transition_us
    hidden_size: int = 3584
    total_tokens: int = 16384  # 112 MiB of bf16 embeddings at H=3584
    default_tokens: int = 8192
    block_sizes: tuple[int, ...] = (128, 8192)
    repeats: int = 5
    fuzz_steps: int = 1000
    seed: int = 0
    threads: int | None = None  # torch's intra-op threads for the bench; None keeps torch's default
    # Requests in flight for the scale section; None: in_flight, ten times and fifty times as many.
    scale_sizes: tuple[int, ...] | None = None
    memory_requests: int | None = None  # admissions traced for bytes_per_request; None: ten times in_flight

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.scale_sizes or (self.in_flight, 10 * self.in_flight, 50 * self.in_flight)

    @property
    def memory_requests_resolved(self) -> int:
        return self.memory_requests or 10 * self.in_flight


FULL = BenchConfig()  # the bench as ``epd-receiver bench`` runs it by default
TINY = BenchConfig(
    in_flight=20,
    poll_iterations=5,
    lifecycles=20,
    hidden_size=8,
    total_tokens=96,
    default_tokens=40,
    block_sizes=(4, 64),
    repeats=2,
    fuzz_steps=20,
)
