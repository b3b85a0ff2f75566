"""Small worlds walked exhaustively (adapters/kit/explore.py): the controller comes out clean, and the walk is
sharp, since every catalogued variant whose recorded minimal schedule fits a world's bound is found.

Every state reached is judged after the event that reached it and again after draining it. The standard
worlds (adapters/kit/explore.py, WORLDS; pools of three blocks), their bounds in events from the empty world,
and what a walk covers (2-core machine, under load):

| world            | ranks | B | arrivals (at most)           | events      | bound | states | transitions | s  |
|------------------|-------|---|------------------------------|-------------|-------|--------|-------------|----|
| one request, B=2 | 1     | 2 | fits resume big huge rounds warm-up (1) | all | 16 | 2450 | 5016      | 5  |
| two requests     | 1     | 1 | fits big rounds (2)          | shared      | 6     | 5041   | 8026        | 12 |
| three requests   | 1     | 1 | fits big (3)                 | flow        | 7     | 2968   | 5117        | 10 |
| async abort      | 1     | 1 | fits resume (2)              | shared      | 6     | 2979   | 5049        | 6  |
| local conclusion | 1     | 1 | fits resume (2)              | shared      | 6     | 2297   | 3765        | 5  |
| two ranks        | 2     | 1 | fits resume rounds (1)       | all, 1 rank | 5     | 987    | 1963        | 8  |

"all": the whole vocabulary; "shared": all but the faults of one request's own sender or data (kill,
backwards and late statuses, corrupt aux or data); "flow": arrive, step, deliver, release, abort; "1
rank": a landing, a corrupt row or a clock move may reach one rank alone. The one-request world is walked
to the end: after 13 events nothing new is reachable. Every variant is found, most by the drain after one
arrival, the deepest after five events; five of them have recorded schedules beyond every bound (more
arrivals or events than a world offers) and are found all the same, in fewer events. The merging itself
is tested: two paths that reach one fingerprint have the same future. The counts are printed at the end
of the module (visible with -s).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from epd_receiver.adapters.kit.explore import (
    WORLDS,
    Exploration,
    SmallWorld,
    bench,
    copy_fork,
    explore,
    hunt,
    worlds_for,
)
from epd_receiver.adapters.kit.explore_world import Bench, enabled, fingerprint
from epd_receiver.adapters.kit.geometry import small_config
from epd_receiver.adapters.kit.judge import label
from epd_receiver.adapters.kit.scenario import replay
from epd_receiver.adapters.kit.variant_records import scenario_path
from epd_receiver.adapters.kit.variants import CATALOGUE, Variant
from epd_receiver.adapters.tools.cli import main
from epd_receiver.fsm.config import first_allocation

BUGS = Path(__file__).parents[2] / "spec" / "scenarios" / "bugs"
REPORT: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Any:
    """Print what each walk covered and where each variant was found."""
    yield
    for line in REPORT:
        print(line)


def _counts(result: Exploration) -> str:
    reach = f"complete at {len(result.levels) - 2}" if result.complete else f"bound {result.depth}"
    return (
        f"{result.world:18} ranks={result.ranks} {reach:15} states={result.states:<6} "
        f"transitions={result.transitions:<6} drains={result.drains:<6} {result.seconds:5.1f} s"
    )


@pytest.mark.parametrize("small", WORLDS, ids=[w.name for w in WORLDS])
def test_the_controller_explores_clean(small: SmallWorld) -> None:
    result = explore(small)
    REPORT.append(_counts(result) + "  clean" * result.clean)

    assert result.clean, result.scenario
    assert result.drains == result.states, "every state reached is drained"
    walked = result.levels[:-1] if result.complete else result.levels
    assert all(walked), f"a level reached nothing new before the bound: {result.levels}"
    if small.name.startswith("one request"):
        assert result.complete, "one request, every event: the whole reachable space fits the bound"


def _fits(recorded: dict[str, Any], small: SmallWorld) -> bool:
    """The recorded schedule has the world's ranks and link behaviour, no more arrivals than it offers,
    and no more events (before its drain) than its bound; in size, not geometry (the recorded pools hold
    two blocks, these three)."""
    events = [e for e in recorded["events"] if "drain" not in e]
    config = recorded["config"]
    return (
        recorded.get("ranks", 1) == small.ranks
        and sum("arrive" in e for e in events) <= small.vocabulary.requests
        and len(events) <= small.depth
        and bool(config.get("async_abort")) == small.config.async_abort
        and bool(config.get("local_conclusion")) == small.config.local_conclusion
    )


@pytest.mark.parametrize("variant", CATALOGUE, ids=[v.name for v in CATALOGUE])
def test_each_variant_within_the_bound_is_found(variant: Variant) -> None:
    recorded = json.loads(scenario_path(BUGS, variant).read_text(encoding="utf-8"))
    within = any(_fits(recorded, small) for small in worlds_for(variant.ranks))

    found = hunt(variant)

    if found is None:
        REPORT.append(f"{variant.name:34} NOT found (recorded schedule within the bound: {within})")
        assert not within, f"{variant.name}: its recorded schedule fits a world's bound, yet the walk missed it"
        pytest.skip(f"{variant.name}: beyond every world's bound")
    by = label(found.first_violation or "")
    REPORT.append(
        f"{variant.name:34} found in {found.world!r} after {found.found_at} events by {by} ({found.states} states, "
        f"{found.seconds:.1f} s; recorded schedule {'within' if within else 'beyond'} the bound)"
    )
    assert found.scenario is not None
    again = replay(found.scenario, **variant.options(), rig=variant.rig)
    assert again["violations"][:1] == [found.first_violation], "the scenario replays the violation exactly"
    assert replay(found.scenario)["violations"] == [], "the controller itself is clean on the same schedule"


def test_the_explorer_can_fail_and_says_where() -> None:
    """A variant breaks the walk: the walk stops there and hands back a scenario in the recorded form."""
    result = explore(WORLDS[0], CATALOGUE[1], stop_at_first=True)

    assert not result.clean and result.violations == 1
    assert result.scenario is not None
    assert {"description", "caught_by", "first_violation", "steps", "variant", "bug", "config", "events"} <= set(
        result.scenario
    )
    events = [e for e in result.scenario["events"] if "drain" not in e]
    assert result.scenario["steps"] == result.found_at == len(events) == 2  # arrive, step: an init of D tokens


@pytest.mark.parametrize("small", [WORLDS[1], worlds_for(2)[0]], ids=["one rank", "two ranks"])
def test_a_deepcopy_fork_walks_what_a_replay_walks(small: SmallWorld) -> None:
    """The copies are independent: forking by deepcopy and by replaying the event log from a fresh world
    reach the same states by the same transitions (the copy is the faster: about twice, on one rank)."""
    copied = explore(small.bounded(3), fork="copy")
    replayed = explore(small.bounded(3), fork="replay")

    assert (copied.states, copied.transitions, copied.levels) == (
        replayed.states,
        replayed.transitions,
        replayed.levels,
    )


def test_a_walk_is_deterministic() -> None:
    first, second = (explore(WORLDS[3].bounded(4)) for _ in range(2))

    assert first.summary() | {"seconds": 0} == second.summary() | {"seconds": 0}


def test_the_command_prints_the_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explore", "--depth", "2", "--ranks", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [e["world"] for e in report["explorations"]] == [w.name for w in worlds_for(1)]
    assert report["scenario"] is None and all(e["violations"] == 0 for e in report["explorations"])

    assert main(["explore", "--variant", "hold-and-wait", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scenario"]["variant"] == "hold-and-wait" and report["scenario"]["caught_by"] == "I8"

    assert main(["explore", "--variant", "ranks-decide-alone", "--depth", "2"]) == 1
    assert "not found" in capsys.readouterr().out


def _future(world: Bench, small: SmallWorld) -> tuple[object, ...]:
    """What can happen next from ``world``: each enabled event and the state it leads to, and the drain's
    verdict and end state."""
    successors = []
    for event in enabled(world, small.vocabulary):
        child = copy_fork(world)
        successors.append((event, fingerprint(child) if event.apply(child) else None))
    drained = copy_fork(world)
    drained.drain()
    return tuple(successors), tuple(drained.check()), fingerprint(drained)


MERGE_PROBES = [w.bounded(4 if w.ranks == 1 else 3) for w in WORLDS]


@pytest.mark.parametrize("small", MERGE_PROBES, ids=[w.name for w in MERGE_PROBES])
def test_states_merged_by_fingerprint_have_the_same_future(small: SmallWorld) -> None:
    """The fingerprint merges only what it may: whenever a path reaches a state already seen by another
    path, both have the same events enabled, lead by each to equal states, and drain to the same verdict."""
    first: dict[tuple[object, ...], Bench] = {}
    frontier, merged = [bench(small)], 0
    for _ in range(small.depth):
        reached = []
        for world in frontier:
            for event in enabled(world, small.vocabulary):
                child = copy_fork(world)
                if not event.apply(child):
                    continue
                key = fingerprint(child)
                if key in first:
                    assert _future(child, small) == _future(first[key], small), child.log
                    merged += 1
                else:
                    first[key] = child
                    reached.append(child)
        frontier = reached

    assert merged > 20


def test_every_world_fits_its_first_allocation_and_a_world_that_cannot_is_refused() -> None:
    """A queue refuses a pool smaller than A0: no standard world is one, and none can be built by mistake."""
    for small in WORLDS:
        config = small.config
        assert first_allocation(config.default_alloc_tokens, config.block_size) <= config.num_blocks, small.name

    with pytest.raises(ValueError, match="num_blocks=2"):
        small_config(4, 2, 3)
