"""How the bench times: each action alone, and competing actions in turns on the same machine."""

from __future__ import annotations

import time
from collections.abc import Callable


def seconds(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def interleaved(actions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best seconds of each action, run in turns so that drift in the machine hits all of them alike.

    The best of several runs, not the median: on a shared machine the slower runs measure the neighbours.
    """
    return best_in_turns(timed(actions), repeats)


def timed(actions: dict[str, Callable[[], object]]) -> dict[str, Callable[[], float]]:
    """Each action as a call that answers its own seconds, for ``best_in_turns``."""
    return {name: (lambda a=action: seconds(a)) for name, action in actions.items()}


def best_in_turns(timed: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Best of what each call reports, in turns: for actions that must set up before the part timed."""
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(repeats):
        for name, measure in timed.items():
            samples[name].append(measure())
    return {name: min(values) for name, values in samples.items()}
