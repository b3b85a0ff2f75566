"""A seeded random walk over the World's vocabulary, judged after every event, without Hypothesis.

The Hypothesis fuzzer (``fuzz.py``) spends most of a step inside Hypothesis: choosing a rule, drawing its
arguments, calling one invariant per property. This walk draws from ``random.Random(seed)`` instead and
takes its events from the exhaustive explorer's vocabulary (``explore_world.enabled``, the events that
make sense in the current state): arrivals of every kind the explorer knows, scheduler iterations, whole
and partial landings (on one rank alone, with several), acting on an abort, releases, client aborts,
failing, dying and backwards senders, late statuses, corrupt aux rows and data, and the clock moved just
past each deadline ahead; and the fuzzer's faults beyond the explorer's (``EVENTS_FAULTS``): statuses
outside KVPoll and wrong landed counts, links that raise, and aborts of requests that already ended.

A run is one random small world, drawn by the fuzzer's rule (``geometry.draw_config``: pool geometry with
A0 never larger than the pool, hidden size, deepstack layers, an asynchronous abort or links that conclude
locally), on one to three ranks. It lives
through a few episodes: in each, a few requests may arrive and a random number of events happen; then
the world is drained (a fair schedule to the end: the liveness and leak verdicts) and the next episode
reuses its pool, stale aux rows and all. An episode also ends when nothing is left to happen in it.

Each event is a scheduler iteration with probability ``P_STEP``; otherwise a method of the World is
chosen by its weight among those with an enabled event (a landing likelier than a fault), then one of its
events uniformly. Every event is judged (``world.check()``) right after it, and every drain after it; the
first violation ends the walk and comes back with the world's replay scenario, which ``epd-receiver
replay`` repeats exactly (drains included).

Where a step's time goes (``cProfile``, one rank): about half in applying the event (the controller's
step through the ``transitions`` Machine, the in-process sender's writes), a fifth in listing the enabled
events (``explore_world.enabled``), a tenth in the judge's check, a tenth in building worlds and draining
them; this module's own share is a few percent. On several ranks a step costs about ten times as much:
most of it is waiting for the rank threads that every scheduler iteration starts (``replicas.py``).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from epd_receiver.adapters.kit.explore_world import EVENTS_ALL, EVENTS_FAULTS, KINDS, Bench, Event, Vocabulary, enabled
from epd_receiver.adapters.kit.geometry import MAX_TOTAL, RandomDraw, draw_config
from epd_receiver.adapters.kit.judge import label
from epd_receiver.adapters.kit.replicas import ReplicaWorld
from epd_receiver.adapters.kit.variants import Variant
from epd_receiver.adapters.kit.world import World
from epd_receiver.adapters.kit.world_config import WorldConfig

BANK_ROWS = 31
KIND_NAMES = tuple(KINDS)
# T values an aux row can never hold: zero, negative, beyond the largest request
CORRUPT_TOTALS = (0, -1, -(2**31), MAX_TOTAL + 1)
EPISODES = 4  # a run lives through 1 to EPISODES episodes
EPISODE_EVENTS = 60  # an episode lasts 1 to EPISODE_EVENTS events
EVENTS_PER_ARRIVAL = 8  # an episode of n events lets 1 to ceil(n / 8) requests arrive
P_STEP = 0.5  # a scheduler iteration, whatever else is enabled
# How likely each other method is, before the choice among its enabled events: the flow of a transfer
# outweighs the faults, so that requests get far enough for the faults to matter.
WEIGHTS: dict[str, float] = {
    "arrive": 2.0,
    "deliver": 4.0,
    "stop": 1.5,
    "release": 1.5,
    "advance": 1.0,
    "abort": 0.25,
    "fail": 0.25,
    "kill": 0.15,
    "go_backwards": 0.15,
    "late_status": 0.25,
    "corrupt_aux": 0.25,
    "corrupt_data": 0.25,
    "misreport": 0.25,
    "misreport_landed": 0.15,
    "break_link": 0.1,
}
VOCABULARY = EVENTS_ALL | EVENTS_FAULTS
# an abort after the end is an "abort" event: it is weighed with the others
assert set(WEIGHTS) == VOCABULARY - {"step", "abort_ended"}
STEP = Event("step")
IDLE = frozenset({"step", "advance"})


@dataclass(frozen=True, slots=True)
class Run:
    """One run's small world: its configuration, ranks, sender seed and number of episodes."""

    config: WorldConfig
    ranks: int
    seed: int
    episodes: int


def draw_run(rng: random.Random, ranks: int | None = None) -> Run:
    """A random small world, drawn by the fuzzer's rule (``geometry.draw_config``); ``ranks`` None draws 1 to 3."""
    config = draw_config(RandomDraw(rng))
    return Run(config, ranks or rng.randint(1, 3), rng.randrange(1 << 16), rng.randint(1, EPISODES))


def bench(run: Run, variant: Variant | None = None) -> Bench:
    """A fresh bench of ``run``, running the real controller or ``variant`` (and its rig, if any)."""
    options: dict[str, Any] = {"seed": run.seed, "bank_rows": BANK_ROWS, **(variant.options() if variant else {})}
    world: Bench = World(run.config, **options) if run.ranks == 1 else ReplicaWorld(run.config, run.ranks, **options)
    if variant is not None and variant.rig is not None:
        variant.rig(world)
    return world


@dataclass(slots=True)
class Walk:
    """What a walk did, and the first violation it met (with its replay scenario)."""

    seed: int
    ranks: int | None  # None: each run drew 1 to 3
    variant: str | None
    steps: int = 0  # events applied and judged (one the World refused is judged too, but not counted)
    refused: int = 0
    runs: int = 0
    drains: int = 0
    seconds: float = 0.0
    violation: str | None = None
    found_at: int | None = None  # steps walked, over every run, when the violation was met
    run_events: int | None = None  # events of the failing run (refused ones too) when it was met
    scenario: dict[str, Any] | None = None
    by_method: dict[str, int] = field(default_factory=dict)  # steps by World method

    @property
    def clean(self) -> bool:
        return self.violation is None

    @property
    def steps_per_s(self) -> float:
        return round(self.steps / self.seconds, 1) if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        names = ("seed", "ranks", "variant", "steps", "refused", "runs", "drains", "violation", "found_at")
        return {n: getattr(self, n) for n in names} | {
            "by": label(self.violation) if self.violation else None,
            "run_events": self.run_events,
            "seconds": round(self.seconds, 2),
            "steps_per_s": self.steps_per_s,
            "by_method": dict(sorted(self.by_method.items())),
        }


def walk(steps: int, seed: int = 0, *, ranks: int | None = 1, variant: Variant | None = None) -> Walk:
    """Walk ``steps`` judged events from ``seed`` on the real controller or ``variant``, stopping at the
    first violation. ``ranks``: each run's rank count (None draws 1 to 3 per run); a variant of several
    ranks is walked on its own count."""
    if variant is not None and variant.ranks > 1:
        ranks = variant.ranks
    rng = random.Random(seed)
    result = Walk(seed, ranks, variant.name if variant else None)
    started = time.perf_counter()
    try:
        while result.steps < steps and result.clean:
            _Run(rng, result, draw_run(rng, ranks), variant).walk(steps)
    finally:
        result.seconds = time.perf_counter() - started
    return result


class _Run:
    """One world through its episodes."""

    def __init__(self, rng: random.Random, result: Walk, run: Run, variant: Variant | None) -> None:
        self.rng, self.result, self.run, self.variant = rng, result, run, variant
        self.world = bench(run, variant)
        self.events = 0  # events applied to this world, refused ones too
        result.runs += 1

    def walk(self, steps: int) -> None:
        rng, result, world = self.rng, self.result, self.world
        for _ in range(self.run.episodes):
            length = rng.randint(1, EPISODE_EVENTS)
            arrivals = rng.randint(1, -(-length // EVENTS_PER_ARRIVAL))
            vocabulary = Vocabulary(KIND_NAMES, len(world.outcomes) + arrivals, VOCABULARY, CORRUPT_TOTALS)
            if not self._episode(min(length, steps - result.steps), vocabulary):
                return
            world.drain()
            result.drains += 1
            if not self._judged(accepted=None, method="drain") or result.steps >= steps:
                return

    def _episode(self, length: int, vocabulary: Vocabulary) -> bool:
        """Up to ``length`` events, each judged; False at the first violation."""
        rng, world = self.rng, self.world
        for _ in range(length):
            event = next_event(rng, world, vocabulary)
            if event is None:
                break
            accepted = event.apply(world)
            self.events += 1
            if not self._judged(accepted, event.method):
                return False
        return True

    def _judged(self, accepted: bool | None, method: str) -> bool:
        """Count the event (``accepted`` None: a drain) and judge the world; False on a violation."""
        result = self.result
        if accepted:
            result.steps += 1
            result.by_method[method] = result.by_method.get(method, 0) + 1
        elif accepted is False:
            result.refused += 1
        found = self.world.check()
        if found:
            self._record(found)
        return not found

    def _record(self, found: list[str]) -> None:
        result, variant = self.result, self.variant
        result.violation, result.found_at, result.run_events = found[0], result.steps, self.events
        about = f"random walk, seed {result.seed}, run {result.runs}, after {self.events} events"
        if variant is not None:
            about = f"{'new' if variant.bug is None else f'#{variant.bug}'}: {variant.trigger} ({about})"
        extra = {"variant": variant.name, "bug": variant.bug} if variant is not None else {}
        result.scenario = {"description": about, "caught_by": label(found[0]), "first_violation": found[0]}
        result.scenario |= {"steps": self.events} | self.world.scenario(**extra)


def next_event(rng: random.Random, world: Bench, vocabulary: Vocabulary) -> Event | None:
    """A scheduler iteration with probability ``P_STEP`` (always enabled: the rest need not be listed),
    else ``choose`` among the enabled events; None when the episode is over: nothing is in the queue and
    nothing but iterations and the clock is enabled (every request that may arrive has come and gone)."""
    if world.queue and rng.random() < P_STEP:
        return STEP
    events = enabled(world, vocabulary)
    if not world.queue and all(event.method in IDLE for event in events):
        return None
    return choose(rng, events)


def choose(rng: random.Random, events: Sequence[Event]) -> Event:
    """A method by its weight among those with an enabled event (``WEIGHTS``; iterations aside), then one
    of its events uniformly; an iteration when nothing else is enabled."""
    groups: dict[str, list[Event]] = {}
    for event in events:
        group = groups.get(event.method)
        if group is None:
            groups[event.method] = [event]
        else:
            group.append(event)
    groups.pop("step", None)
    if not groups:
        return STEP
    x = rng.random() * sum(WEIGHTS[method] for method in groups)
    for method in groups:
        x -= WEIGHTS[method]
        if x < 0:
            break
    group = groups[method]
    return group[int(rng.random() * len(group))]


# ---- the command ---------------------------------------------------------------------------------------


def command(steps: int, seed: int, ranks: int | None, variant: Variant | None, as_json: bool) -> int:
    """``epd-receiver walk``: the controller must walk clean, a variant must be found; with ``as_json`` the
    counts and the first violation as a replay scenario."""
    result = walk(steps, seed, ranks=ranks, variant=variant)
    if as_json:
        print(json.dumps({"walk": result.summary(), "scenario": result.scenario}, indent=1))
    else:
        verdict = "clean" if result.clean else f"{result.violation} (after {result.found_at} steps)"
        print(
            f"walk seed={result.seed} ranks={result.ranks or '1-3'} steps={result.steps} refused={result.refused} "
            f"runs={result.runs} drains={result.drains} {result.seconds:.2f} s ({result.steps_per_s:.0f} steps/s)  "
            f"{verdict}"
        )
        if variant is not None and result.clean:
            print(f"{variant.name}: not found within {steps} steps")
        elif variant is None and not result.clean:
            again = f"--steps {steps} --seed {seed}" + (f" --ranks {ranks or 0}" if ranks != 1 else "")
            print(f"the scenario: epd-receiver walk {again} --json")
    failed = result.clean if variant is not None else not result.clean
    return 1 if failed else 0
