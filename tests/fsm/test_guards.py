"""One kind of guard: transitions carry them, poll cells never do, and guards of one trigger and source
exclude each other, so that the file's order of transitions cannot change what the controller does.

A poll cell that fired its event "if" some guard was a second mechanism beside the transitions' own
guards: two places to read, and a cell could disagree with the transition it fires. The fast path it
bought is kept by deriving, at load time, the guards a quiet cell is refused by from the transitions.
"""

from __future__ import annotations

import random
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from support.spec_text import dump_toml

from epd_receiver.adapters.ports.allocator import OwningBlockAllocator
from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.adapters.ports.sender import InProcessSender
from epd_receiver.adapters.ports.sender_links import WarmupLink
from epd_receiver.fsm import (
    Aborted,
    KVPoll,
    ReceiverConfig,
    ReceiverQueue,
    ReceiverRequest,
    SenderFailed,
    SpecError,
    State,
    load_spec,
)
from epd_receiver.fsm.spec import Guards, ReceiverSpec, default_spec_text

B = 4
D = 2 * B


def raw_spec() -> dict[str, Any]:
    return tomllib.loads(default_spec_text())


# ---- poll cells name no guard ---------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["round_landed if sender_progressed", "round_landed unless is_warmup"])
def test_a_poll_cell_with_a_guard_is_refused_saying_where_guards_go(cell: str) -> None:
    with pytest.raises(
        SpecError, match=r"^polls\.RESUMING\.Transferring: .*guard belongs on the event's \[\[transitions\]\]"
    ):
        load_spec(overlay={"polls": {"RESUMING": {"Transferring": cell}}})


def test_the_packaged_poll_table_names_no_guard() -> None:
    for table in raw_spec()["polls"].values():
        cells = table.values() if isinstance(table, dict) else [table]
        assert all(len(cell.split()) == 1 for cell in cells), table


def test_a_quiet_cell_is_refused_by_the_guards_of_its_transitions_derived_at_load_time() -> None:
    spec = load_spec()
    progressed = (Guards(conditions=("sender_progressed",)),)
    assert spec.polls[State.RESUMING][KVPoll.Transferring].enabled_if == progressed
    # a cell whose transitions always take the event needs no check: the is_warmup pair covers both answers
    assert spec.polls[State.TRANSFERRING][KVPoll.Success].enabled_if == ()
    assert spec.polls[State.TRANSFERRING][KVPoll.Failed].enabled_if == ()

    def guard_round_by_warmup(raw: dict[str, Any]) -> None:
        (round_landed,) = [t for t in raw["transitions"] if t["trigger"] == "round_landed"]
        round_landed["conditions"] = ["is_warmup"]

    edited = load_edited(guard_round_by_warmup)
    assert edited.polls[State.RESUMING][KVPoll.Transferring].enabled_if == (Guards(conditions=("is_warmup",)),)


def load_edited(edit: Callable[[dict[str, Any]], None]) -> ReceiverSpec:
    raw = raw_spec()
    edit(raw)
    return load_spec(dump_toml(raw))


# ---- a real queue, to count the Machine's triggers and compare behaviours ------------------------------------


@dataclass
class Rig:
    pool: TorchBlockBuffers
    allocator: OwningBlockAllocator
    sender: InProcessSender
    queue: ReceiverQueue[EmbeddingPayload]

    @classmethod
    def make(cls, spec: ReceiverSpec | None = None, num_blocks: int = 8, async_abort: bool = False) -> Rig:
        pool = TorchBlockBuffers(num_blocks, B, 8)
        allocator = OwningBlockAllocator(num_blocks, B)
        sender = InProcessSender(pool, bank_rows=64, async_abort=async_abort)
        queue: ReceiverQueue[EmbeddingPayload] = ReceiverQueue(
            pool, allocator, ReceiverConfig(default_alloc_tokens=D), spec=spec
        )
        return cls(pool, allocator, sender, queue)

    def add(self, room: int, total: int, **options: Any) -> ReceiverRequest[EmbeddingPayload]:
        return self.queue.add(room, self.sender.add_room(room, total, **options))


class CountingTriggers(ReceiverRequest[EmbeddingPayload]):
    """Counts every call into the Machine's trigger machinery, taken or not."""

    triggered: int = 0

    def fire(self, event: str, **kwargs: Any) -> None:
        type(self).triggered += 1
        super().fire(event, **kwargs)


def test_a_quiet_poll_does_not_call_the_machines_trigger() -> None:
    """The repeated Transferring of a resumed request without progress is the hottest cell of all."""
    pool = TorchBlockBuffers(8, B, 8)
    sender = InProcessSender(pool, bank_rows=64)
    queue: ReceiverQueue[EmbeddingPayload] = ReceiverQueue(
        pool, OwningBlockAllocator(8, B), ReceiverConfig(default_alloc_tokens=D), request_class=CountingTriggers
    )
    request = queue.add(1, sender.add_room(1, 3 * D))
    queue.step()  # blocks_granted
    sender.deliver(1)
    queue.step()  # first_chunk_landed, then blocks_granted for the remainder
    assert request.state is State.RESUMING
    CountingTriggers.triggered = 0

    for _ in range(5):
        queue.step()  # Transferring every time: the guard refuses round_landed before any trigger

    assert request.state is State.RESUMING
    assert CountingTriggers.triggered == 0


def test_a_fenced_request_polled_without_evidence_calls_no_trigger() -> None:
    rig = Rig.make(async_abort=True)
    request = rig.add(1, 3 * D)
    rig.queue.step()
    rig.queue.abort(1)  # the sender has not acted on it: the blocks are fenced
    rig.queue.step()
    assert request.fenced and rig.queue.fenced_rooms == (1,)
    calls = 0
    original = request.fire

    def counting(event: str, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        original(event, **kwargs)

    request.fire = counting  # type: ignore[method-assign]
    rig.queue.step()
    rig.queue.step()
    assert calls == 0 and request.fenced
    rig.sender.act_on_abort(1)
    rig.queue.step()
    assert calls == 1 and not request.fenced and rig.queue.fenced_rooms == ()


# ---- transitions of one trigger and source exclude each other ----------------------------------------------


def test_two_overlapping_transitions_are_refused_naming_the_trigger_the_source_and_both() -> None:
    overlay = {
        "transitions": [
            {
                "trigger": "fail",
                "source": "RESUMING",
                "dest": "FAILED",
                "actions": ["record_error", "notify_sender", "free_blocks"],
            }
        ]
    }
    expected = (
        r"^transitions of 'fail' from RESUMING overlap: "
        r"\(fail TRANSFERRING/RESUMING -> FAILED \[sender_may_write\]\) and \(fail RESUMING -> FAILED\)"
    )
    with pytest.raises(SpecError, match=expected):
        load_spec(overlay=overlay)


def test_a_fail_pair_that_relies_on_the_files_order_is_refused() -> None:
    """The free `fail` without `unless = ["sender_may_write"]`: only its place after the fencing one kept it
    from freeing blocks a sender may still write into."""

    def drop_unless(raw: dict[str, Any]) -> None:
        for t in raw["transitions"]:
            if t["trigger"] == "fail" and "free_blocks" in t["actions"]:
                t.pop("unless", None)

    with pytest.raises(SpecError, match=r"^transitions of 'fail' from TRANSFERRING overlap"):
        load_edited(drop_unless)


def test_guards_that_do_not_exclude_each_other_are_refused_even_when_both_are_guarded() -> None:
    overlay = {
        "transitions": [
            {"trigger": "handshake_done", "source": "BOOTSTRAPPING", "dest": "WAITING_FOR_INPUT", "remove": True},
            {
                "trigger": "handshake_done",
                "source": "BOOTSTRAPPING",
                "dest": "WAITING_FOR_INPUT",
                "conditions": ["is_warmup"],
            },
            {
                "trigger": "handshake_done",
                "source": "BOOTSTRAPPING",
                "dest": "FAILED",
                "conditions": ["holds_fence"],
                "actions": ["record_error"],
            },
        ]
    }
    with pytest.raises(SpecError, match=r"^transitions of 'handshake_done' from BOOTSTRAPPING overlap"):
        load_spec(overlay=overlay)


def test_the_error_event_must_be_taken_whatever_the_guards_answer() -> None:
    overlay = {
        "transitions": [
            {
                "trigger": "fail",
                "source": ["TRANSFERRING", "RESUMING"],
                "dest": "FAILED",
                "unless": ["sender_may_write"],
                "remove": True,
            }
        ]
    }
    with pytest.raises(SpecError, match=r"^'fail' from TRANSFERRING: some answer of the guards takes no transition"):
        load_spec(overlay=overlay)


def test_an_overlay_replaces_the_transition_with_the_same_trigger_sources_and_guards() -> None:
    """The variant that frees blocks in flight replaces the fencing `fail` in place (same key)."""
    frees = {
        "trigger": "fail",
        "source": ["TRANSFERRING", "RESUMING"],
        "dest": "FAILED",
        "conditions": ["sender_may_write"],
        "actions": ["record_error", "notify_sender", "free_blocks"],
    }
    spec = load_spec(overlay={"transitions": [frees]})
    fails = [t for t in spec.transitions_from(State.TRANSFERRING) if t.trigger == "fail"]
    assert sorted((t.conditions, t.unless, t.actions[-1]) for t in fails) == [
        ((), ("sender_may_write",), "free_blocks"),
        (("sender_may_write",), (), "free_blocks"),
    ]


def test_an_overlay_transition_with_other_guards_is_added_never_silently_swapped_in() -> None:
    """Without `unless`, the overlay's blocks_granted is another transition than the file's (which has
    `unless = ["is_warmup"]`): it is added, and refused for overlapping it, rather than replacing it and
    silently dropping the guard that keeps warm-ups from taking blocks."""
    grant = {
        "trigger": "blocks_granted",
        "source": "WAITING_FOR_INPUT",
        "dest": "TRANSFERRING",
        "actions": ["take_blocks", "send_init"],
    }
    with pytest.raises(SpecError, match=r"^transitions of 'blocks_granted' from WAITING_FOR_INPUT overlap"):
        load_spec(overlay={"transitions": [grant]})
    guarded = load_spec(overlay={"transitions": [{**grant, "unless": ["is_warmup"]}]})
    (granted,) = [t for t in guarded.transitions_from(State.WAITING_FOR_INPUT) if t.trigger == "blocks_granted"]
    assert (granted.unless, granted.actions) == (("is_warmup",), ("take_blocks", "send_init"))


# ---- the file's order of transitions does not matter -------------------------------------------------------


def abort_in_flight(spec: ReceiverSpec) -> tuple[Any, ...]:
    rig = Rig.make(spec, async_abort=True)
    request = rig.add(1, 3 * D)
    rig.queue.step()
    rig.queue.abort(1)
    rig.queue.step()
    return request.state, type(request.error), request.fenced, rig.allocator.free_count


def sender_fails_mid_resume(spec: ReceiverSpec) -> tuple[Any, ...]:
    rig = Rig.make(spec)
    request = rig.add(1, 3 * D)
    rig.queue.step()
    rig.sender.deliver(1)
    rig.queue.step()
    rig.sender.fail(1)
    rig.queue.step()
    return request.state, type(request.error), request.fenced, rig.allocator.free_count


def resumed_and_warmup(spec: ReceiverSpec) -> tuple[Any, ...]:
    rig = Rig.make(spec)
    request = rig.add(1, 3 * D)
    warmup = rig.queue.add(2, WarmupLink(), warmup=True)
    rig.queue.step()
    rig.sender.deliver(1)
    rig.queue.step()
    rig.sender.deliver(1)
    rig.queue.step()
    rig.queue.release(1)
    mismatches = rig.sender.source(1).mismatches(request.payload) if request.payload is not None else ["none"]
    return request.state, request.reads, warmup.state, warmup.blocks, mismatches, rig.allocator.free_count


SCENARIOS = [abort_in_flight, sender_fails_mid_resume, resumed_and_warmup]


@pytest.mark.parametrize("seed", range(4))
def test_reordering_the_files_transitions_gives_the_same_behaviour(seed: int) -> None:
    def shuffle(raw: dict[str, Any]) -> None:
        if seed == 0:
            raw["transitions"].reverse()
        else:
            random.Random(seed).shuffle(raw["transitions"])

    packaged, reordered = load_spec(), load_edited(shuffle)
    assert [str(t) for t in reordered.transitions] != [str(t) for t in packaged.transitions]
    expected = [
        (State.FAILED, Aborted, (0, 1), 6),
        (State.FAILED, SenderFailed, (), 8),
        (State.SUCCESS, 2, State.SUCCESS, (), [], 8),
    ]
    assert [scenario(packaged) for scenario in SCENARIOS] == expected
    assert [scenario(reordered) for scenario in SCENARIOS] == expected
