"""Small worlds, walked exhaustively: every interleaving of World's vocabulary up to a depth, on the real
controller, with equal states merged.

The fuzzer samples long random programs; this walks short ones completely. A small world is a pool of a
few blocks, a menu of arrivals (a payload that fits A0, one that needs a resume, one larger than the
pool with and without progress, a warm-up), the events it uses and a bound on the number of events. From
the empty world the search applies, breadth first, every event enabled in each state
(``explore_world.enabled``): arrive, step, deliver (whole or partial), fail, abort, kill, advance past
each deadline, a late or backwards status, corrupt aux or data, stop, release, and on several ranks the
same events reaching one rank alone. A state whose fingerprint was seen before is not expanded again.

Every state reached is judged: ``check()`` right after the event that reached it, and ``check()`` again
after draining it (a fair schedule to the end, which adds the liveness and leak verdicts). Breadth first,
a violation is found with as few events as the walk allows, and is reported as a replay scenario.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from epd_receiver.adapters.kit.explore_world import KINDS, Bench, Event, Vocabulary, enabled, fingerprint
from epd_receiver.adapters.kit.geometry import small_config
from epd_receiver.adapters.kit.judge import label
from epd_receiver.adapters.kit.replicas import ReplicaWorld
from epd_receiver.adapters.kit.scenario import EVENTS
from epd_receiver.adapters.kit.variants import Variant
from epd_receiver.adapters.kit.world import World
from epd_receiver.adapters.kit.world_config import WorldConfig

SEED = 2
BANK_ROWS = 31


@dataclass(frozen=True, slots=True)
class SmallWorld:
    """A configuration, its vocabulary and the depth (events from the empty world) it is walked to."""

    name: str
    config: WorldConfig
    vocabulary: Vocabulary
    depth: int
    ranks: int = 1

    def bounded(self, depth: int | None) -> SmallWorld:
        return self if depth is None else SmallWorld(self.name, self.config, self.vocabulary, depth, self.ranks)


# Faults that touch one request's own sender or data: the one-request world takes them all; the worlds of
# several requests sharing a pool leave them out, so that their depth goes to interleavings instead.
OWN_FAULTS = ("kill", "go_backwards", "corrupt_aux", "corrupt_data", "late_status")
CLIENT_AND_SENDER = frozenset({"arrive", "step", "deliver", "release", "abort"})

WORLDS: tuple[SmallWorld, ...] = (
    # every arrival and every event, walked to the end: nothing new is reachable after 13 events
    SmallWorld("one request, B=2", small_config(2, 3, 1), Vocabulary(tuple(KINDS), 1), 16),
    SmallWorld("two requests", small_config(1, 3, 1), Vocabulary(("fits", "big", "rounds"), 2).without(*OWN_FAULTS), 6),
    SmallWorld("three requests", small_config(1, 3, 1), Vocabulary(("fits", "big"), 3, CLIENT_AND_SENDER), 7),
    SmallWorld(
        "async abort",
        small_config(1, 3, 1, async_abort=True),
        Vocabulary(("fits", "resume"), 2).without(*OWN_FAULTS),
        6,
    ),
    SmallWorld(
        "local conclusion",
        small_config(1, 3, 1, local_conclusion=True),
        Vocabulary(("fits", "resume"), 2).without(*OWN_FAULTS),
        6,
    ),
    SmallWorld("two ranks", small_config(1, 3, 1), Vocabulary(("fits", "resume", "rounds"), 1), 5, ranks=2),
)


def worlds_for(ranks: int | None = None) -> list[SmallWorld]:
    """The standard small worlds, or only those with ``ranks`` ranks."""
    return [w for w in WORLDS if ranks is None or w.ranks == ranks]


@dataclass(slots=True)
class Exploration:
    """What one walk did and found."""

    world: str
    ranks: int
    depth: int
    variant: str | None
    fork: str
    states: int = 0
    transitions: int = 0  # events applied (one the World refused is not counted)
    drains: int = 0
    levels: list[int] = field(default_factory=list)  # new states at each depth, from the empty world on
    complete: bool = False  # every reachable state was walked before the bound
    seconds: float = 0.0
    violations: int = 0  # states whose judge spoke (a hunt stops at the first)
    first_violation: str | None = None
    found_at: int | None = None  # events before the first violation (a drain after them not counted)
    scenario: dict[str, Any] | None = None

    @property
    def clean(self) -> bool:
        return self.violations == 0

    def summary(self) -> dict[str, Any]:
        names = ("world", "ranks", "depth", "variant", "fork", "states", "transitions", "drains", "levels")
        found = {"violations": self.violations, "first_violation": self.first_violation, "found_at": self.found_at}
        return (
            {n: getattr(self, n) for n in names}
            | {"complete": self.complete, "seconds": round(self.seconds, 2)}
            | found
        )


def bench(small: SmallWorld, variant: Variant | None = None) -> Bench:
    """A fresh, empty bench of the small world, running the real controller or ``variant``."""
    options: dict[str, Any] = {"seed": SEED, "bank_rows": BANK_ROWS, **(variant.options() if variant else {})}
    ranks = small.ranks
    world: Bench = World(small.config, **options) if ranks == 1 else ReplicaWorld(small.config, ranks, **options)
    if variant is not None and variant.rig is not None:
        variant.rig(world)
    return world


# ---- forking: continuing from one state more than once ---------------------------------------------------


def copy_fork(world: Bench) -> Bench:
    """An independent copy, by deepcopy, sharing only what never changes once built: the spec and its
    tables, the Machine's transitions, the sender's embedding bank and sources, the requests' errors (a
    typed error cannot be rebuilt from its args). Tensors are cloned (a tenth of a tensor's deepcopy; no
    two of them share storage), and a simulated rank's condition variable is a fresh one (no thread waits
    on it between events). Against a replay of the event log from a fresh world, which walks the same
    states (tests/kit/test_explore.py): a copy costs 0.6 to 0.9 ms on one rank and 1.3 ms on two, whatever
    the depth; a replay 0.2 ms and 0.06 ms an event on one rank, and far more on two, where every step
    starts the ranks' threads. Over whole walks the two are within 15% on one rank, and a copy is up to
    three times as fast on two ranks: copying is the default."""
    memo = _shared(world)
    with _partials_copied_directly():
        return copy.deepcopy(world, memo)


def _shared(world: Bench) -> dict[int, Any]:
    memo: dict[int, Any] = {}
    for one in world.ranks if isinstance(world, ReplicaWorld) else [world]:
        wiring = one.queue._wiring
        for immutable in (wiring.spec, wiring.polls, wiring.deadlines, one.sender.bank):
            memo[id(immutable)] = immutable
        for event in one.queue._machine.events.values():
            for transitions in event.transitions.values():
                memo.update((id(t), t) for t in transitions)
        for room in one.sender.rooms():
            source = one.sender.source(room)
            memo[id(source)] = source
        memo.update((id(r.error), r.error) for r in one.queue if r.error is not None)
        memo.update((id(t), t.clone()) for t in _tensors(one))
    if isinstance(world, ReplicaWorld):
        memo[id(world._turns._cond)] = threading.Condition()
    return memo


def _tensors(world: World) -> Iterator[torch.Tensor]:
    """The pool's tensors and those of the payloads being assembled: all a world ever writes."""
    yield from world.pool.buffers()
    for payload in (r.payload for r in world.queue if r.payload is not None):
        yield from (payload.embeddings, payload.fill_ids, payload.mrope_positions)
        if payload.deepstack is not None:
            yield payload.deepstack


@contextlib.contextmanager
def _partials_copied_directly() -> Iterator[None]:
    """deepcopy rebuilds a functools.partial through the generic reduce protocol; copying one directly is
    faster (the Machine binds none onto a request, but a port or a variant may hold some). The same result,
    installed only for the fork."""
    dispatch = copy._deepcopy_dispatch  # type: ignore[attr-defined]
    previous = dispatch.get(functools.partial)
    dispatch[functools.partial] = _copy_partial
    try:
        yield
    finally:
        if previous is None:
            del dispatch[functools.partial]
        else:
            dispatch[functools.partial] = previous


def _copy_partial(original: functools.partial[Any], memo: dict[int, Any]) -> functools.partial[Any]:
    func = copy.deepcopy(original.func, memo)
    copied = functools.partial(func, *copy.deepcopy(original.args, memo), **copy.deepcopy(original.keywords, memo))
    if vars(original):
        vars(copied).update(copy.deepcopy(vars(original), memo))
    memo[id(original)] = copied
    return copied


def replay_fork(build: Callable[[], Bench]) -> Callable[[Bench], Bench]:
    """A copy rebuilt from a fresh bench by replaying the event log: for a bench a deepcopy cannot copy
    faithfully (a rig that wraps the sender in closures, which a deepcopy shares between copies)."""

    def fork(world: Bench) -> Bench:
        fresh = build()
        for event in world.log:
            ((name, argument),) = event.items()
            EVENTS[name](fresh, argument)
        return fresh

    return fork


# ---- the walk ------------------------------------------------------------------------------------------


def explore(
    small: SmallWorld, variant: Variant | None = None, *, stop_at_first: bool = False, fork: str = "auto"
) -> Exploration:
    """Walk ``small`` breadth first to its depth, on the real controller or ``variant``; ``fork`` is "copy",
    "replay" or "auto" (copy, unless the variant rigs the bench)."""
    search = _Search(small, variant, fork, stop_at_first)
    for _ in search.levels():
        pass
    return search.result


def hunt(variant: Variant, worlds: Sequence[SmallWorld] | None = None) -> Exploration | None:
    """Walk ``worlds`` (the standard ones of the variant's rank count by default) a level at a time, all
    abreast, and stop at the first violation: a bug that is shallow in any of them is found at once."""
    searches = [_Search(small, variant, "auto", True) for small in worlds or worlds_for(variant.ranks)]
    walks = [(search, search.levels()) for search in searches]
    while walks:
        for search, walk in list(walks):
            if next(walk, None) is None:
                walks.remove((search, walk))
            if search.done:
                return search.result
    return None


class _Search:
    """Breadth first. A state is checked when an event first reaches it; once its successors are forked
    it is drained in place (it is not needed any more), and a state of the last level is drained as soon
    as it is reached: no fork is spent on a drain, and the last level, the largest, is never held."""

    def __init__(self, small: SmallWorld, variant: Variant | None, fork: str, stop_at_first: bool) -> None:
        if fork == "auto":
            fork = "replay" if variant is not None and variant.rig is not None else "copy"
        self.small, self.variant, self.stop_at_first = small, variant, stop_at_first
        self.fork = copy_fork if fork == "copy" else replay_fork(lambda: bench(small, variant))
        self.result = Exploration(small.name, small.ranks, small.depth, variant.name if variant else None, fork)
        self.seen: set[tuple[object, ...]] = set()

    @property
    def done(self) -> bool:
        return self.stop_at_first and self.result.violations > 0

    def levels(self) -> Iterator[int]:
        """Walk a level per iteration (yielding its depth) until the bound, the end of what is reachable,
        or (when asked to stop there) the first violation."""
        started = time.perf_counter()
        root = bench(self.small, self.variant)
        self.seen.add(fingerprint(root))
        frontier: deque[Bench] = deque([root])
        self.result.states, self.result.levels = 1, [1]
        for depth in range(1, self.small.depth + 1):
            self.result.levels.append(0)
            frontier = self._level(frontier, depth)
            self.result.seconds += time.perf_counter() - started
            self.result.complete = not frontier and not self.done and depth < self.small.depth
            if self.done or self.result.complete:
                return
            yield depth
            started = time.perf_counter()

    def _level(self, frontier: deque[Bench], depth: int) -> deque[Bench]:
        """Expand every state of the frontier by one event; return the clean new states to expand next."""
        reached: deque[Bench] = deque()
        last = depth == self.small.depth
        while frontier and not self.done:
            world = frontier.popleft()
            for event in enabled(world, self.small.vocabulary):
                child = self._reach(world, event)
                if child is not None and self._checked(child, depth):
                    if last:
                        self._drain(child, depth)
                    else:
                        reached.append(child)
                if self.done:
                    return reached
            self._drain(world, depth - 1)
        return reached

    def _reach(self, world: Bench, event: Event) -> Bench | None:
        """The state one event away, or None when the World refused the event or the state was seen."""
        child = self.fork(world)
        if not event.apply(child):
            return None
        self.result.transitions += 1
        key = fingerprint(child)
        if key in self.seen:
            return None
        self.seen.add(key)
        self.result.states += 1
        self.result.levels[-1] += 1
        return child

    def _checked(self, world: Bench, depth: int) -> bool:
        found = world.check()
        if found:
            self._record(world, found, depth)
        return not found

    def _drain(self, world: Bench, depth: int) -> None:
        """A fair schedule to the end from this state: what it adds is liveness and leaks."""
        world.drain()
        self.result.drains += 1
        found = world.check()
        if found:
            self._record(world, found, depth)

    def _record(self, world: Bench, found: list[str], depth: int) -> None:
        """Count the violation; keep the first one with the fewest events, as a replay scenario."""
        result = self.result
        result.violations += 1
        if result.found_at is not None and result.found_at <= depth:
            return
        result.first_violation, result.found_at = found[0], depth
        variant = self.variant
        about = f"explored {self.small.name} to depth {depth}"
        if variant is not None:
            about = f"{'new' if variant.bug is None else f'#{variant.bug}'}: {variant.trigger} ({about})"
        result.scenario = {"description": about, "caught_by": label(found[0]), "first_violation": found[0]}
        result.scenario |= {"steps": depth, "explored": self.small.name}
        extra = {"variant": variant.name, "bug": variant.bug} if variant is not None else {}
        result.scenario |= world.scenario(**extra)


# ---- the command ---------------------------------------------------------------------------------------


def command(depth: int | None, ranks: int | None, variant: Variant | None, as_json: bool) -> int:
    """``epd-receiver explore``: walk the standard worlds (the controller must come out clean) or hunt a
    variant (it must be found); print the counts, and with ``as_json`` the first violation as a scenario."""
    worlds = [w.bounded(depth) for w in worlds_for(ranks if ranks or variant is None else variant.ranks)]
    if variant is not None:
        found = hunt(variant, worlds)
        results = [found] if found is not None else []
        failed = found is None
    else:
        results = [explore(small) for small in worlds]
        failed = any(not r.clean for r in results)
    first = next((r.scenario for r in results if r.scenario is not None), None)
    if as_json:
        print(json.dumps({"explorations": [r.summary() for r in results], "scenario": first}, indent=1))
    else:
        for r in results:
            print(_line(r))
        if variant is not None and found is None:
            print(f"{variant.name}: not found within the bounds")
    return 1 if failed else 0


def _line(result: Exploration) -> str:
    reach = f"complete at depth {len(result.levels) - 2}" if result.complete else f"depth {result.depth}"
    verdict = "clean" if result.clean else f"{result.first_violation} (after {result.found_at} events)"
    return (
        f"{result.world:18} ranks={result.ranks} {reach:20} states={result.states:<6} "
        f"transitions={result.transitions:<6} drains={result.drains:<6} {result.seconds:6.2f} s  {verdict}"
    )
