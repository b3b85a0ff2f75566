"""The gloo rank group across two real processes, started once for the module and reused by every test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from epd_receiver.adapters.ports.ranks import RankJobFailed, RankProcesses, collective, rooms_digest
from epd_receiver.fsm.ports import SingleRank


@pytest.fixture(scope="module")
def ranks() -> Iterator[RankProcesses]:
    with RankProcesses(2) as processes:
        yield processes


def both(ranks: RankProcesses, kind: str, rooms: list[list[int]], values: list[list[int]]) -> list[dict[str, object]]:
    """Each rank makes the same call with its own arguments."""
    return ranks.run_each(collective, [(kind, rooms[r], values[r]) for r in range(2)])


def test_min_reduce_is_element_wise_and_one_collective(ranks: RankProcesses) -> None:
    answers = both(ranks, "min_reduce", [[7, 3, 9], [7, 3, 9]], [[4, 0, 3, 1, 1, 0], [3, 2, 4, 1, 0, 0]])
    assert answers == [{"result": [3, 0, 3, 1, 0, 0], "collectives": 1}] * 2


def test_rooms_in_another_order_raise_on_every_rank(ranks: RankProcesses) -> None:
    answers = both(ranks, "min_reduce", [[1, 2], [2, 1]], [[4, 4], [4, 4]])
    assert answers == [{"raised": "RankDivergence", "collectives": 1}] * 2


def test_different_room_counts_raise_instead_of_aborting_gloo(ranks: RankProcesses) -> None:
    answers = both(ranks, "min_reduce", [[1, 2, 3], [1, 2]], [[4, 4, 4, 1, 1, 1], [4, 4, 1, 1]])
    assert [a["raised"] for a in answers] == ["RankDivergence"] * 2
    # The group is still usable afterwards: the frames had the same length.
    assert both(ranks, "min_reduce", [[5], [5]], [[2], [3]])[0]["result"] == [2]


def test_same_is_true_only_when_every_value_matches(ranks: RankProcesses) -> None:
    assert [a["result"] for a in both(ranks, "same", [[], []], [[16384, 8192, -5], [16384, 8192, -5]])] == [True] * 2
    assert [a["result"] for a in both(ranks, "same", [[], []], [[16384, 8192, -5], [16384, 8193, -5]])] == [False] * 2
    assert [a["result"] for a in both(ranks, "same", [[], []], [[1, 2], [1, 2, 3]])] == [False] * 2
    assert [a["result"] for a in both(ranks, "same", [[], []], [[], []])] == [True] * 2


def test_a_long_call_grows_the_frame_alike_on_every_rank(ranks: RankProcesses) -> None:
    rooms = list(range(500))
    first = both(ranks, "min_reduce", [rooms, rooms], [[4] * 1000, [3] * 1000])
    assert [a["result"] for a in first] == [[3] * 1000] * 2
    assert [a["collectives"] for a in first] == [2, 2]  # once to learn the size, once with it
    again = both(ranks, "min_reduce", [rooms, rooms], [[4] * 1000, [3] * 1000])
    assert [a["collectives"] for a in again] == [1, 1]


def test_a_value_out_of_range_raises_there_and_leaves_no_rank_waiting(ranks: RankProcesses) -> None:
    with pytest.raises(RankJobFailed, match=r"rank 0: ValueError") as failure:
        both(ranks, "same", [[], []], [[1 << 62], [0]])
    assert "rank 1" not in str(failure.value)
    with pytest.raises(RankJobFailed, match=r"rank 0: ValueError") as failure:
        both(ranks, "min_reduce", [[1], [1]], [[1 << 62], [0]])
    assert "rank 1: RankDivergence" not in str(failure.value)  # rank 1 answered: the divergence, as data
    assert both(ranks, "same", [[], []], [[1], [1]])[0]["result"] is True


def test_single_rank_is_the_identity() -> None:
    single = SingleRank()
    assert single.size == 1
    assert single.min_reduce([1, 2], [3, 4]) == [3, 4]
    assert single.same([1])


def test_the_rooms_digest_sees_order() -> None:
    assert rooms_digest([1, 2]) != rooms_digest([2, 1])
    assert 0 <= rooms_digest(list(range(1000))) < 1 << 62
