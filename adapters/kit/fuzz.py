"""The protocol fuzzer: the receiver under a random sender, a random scheduler and a random client.

Each rule is something the world can do to the controller; the invariants are judged by the World from
what the sender was asked and wrote, what the allocator says, and which reads reached the pool, never
from the controller's own bookkeeping. Random pool geometry and lengths give random chunkings: a
payload may fit A0, need one resume, or be larger than the whole pool.

The invariants, one per property, are ``fuzz_invariants.py``; the budgets, ``fuzz_profiles.py``.

It ships with the package (``pip install epd-receiver[fuzz]``) so that a serving system can run it
against its own controller subclass, and so that ``epd-receiver variants`` can prove it sharp.
"""

from __future__ import annotations

import ast
import contextlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from hypothesis import event, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from epd_receiver.adapters.kit.faults import LINK_CALLS
from epd_receiver.adapters.kit.fuzz_invariants import INVARIANT_NAME, PropertyInvariants
from epd_receiver.adapters.kit.fuzz_invariants import PROPERTIES as PROPERTIES
from epd_receiver.adapters.kit.fuzz_profiles import PROFILES as PROFILES
from epd_receiver.adapters.kit.fuzz_profiles import register_profiles as register_profiles
from epd_receiver.adapters.kit.geometry import MAX_TOTAL, draw_config
from epd_receiver.adapters.kit.judge import label as catch_label
from epd_receiver.adapters.kit.replicas import ReplicaWorld
from epd_receiver.adapters.kit.variants import Variant
from epd_receiver.adapters.kit.world import World
from epd_receiver.adapters.kit.world_config import WorldConfig
from epd_receiver.fsm import ReceiverRequest, State

MAX_LIVE = 5
IMPOSSIBLE_TOTALS = st.sampled_from([0, -1, -(2**31), MAX_TOTAL + 1])
# statuses, values beside them, and the extremes a garbled 32-bit field can hold
ANY_STATUS = st.one_of(st.integers(-2, 7), st.sampled_from([2**31 - 1, -(2**31)]))


class _DataDraw:
    """``geometry.Draw`` from Hypothesis' data: each value is labelled, and shrinks."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def integer(self, name: str, low: int, high: int) -> int:
        return self.data.draw(st.integers(low, high), label=name)

    def choice(self, name: str, options: Sequence[int]) -> int:
        return self.data.draw(st.sampled_from(options), label=name)

    def flag(self, name: str) -> bool:
        return self.data.draw(st.booleans(), label=name)


class ReceiverProtocol(PropertyInvariants, RuleBasedStateMachine):
    """Run against the real controller, or against a Variant by ``protocol_for(variant)``."""

    world: World
    variant: ClassVar[Variant | None] = None
    last_world: ClassVar[World | None] = None
    judged_states: ClassVar[int] = 0  # world states the judge ruled on, over every run of this class

    def __init__(self) -> None:
        super().__init__()
        self.next_room = 0

    @initialize(data=st.data())
    def a_pool(self, data: st.DataObject) -> None:
        """A random small world (``geometry.draw_config``: never one whose A0 exceeds the pool), then arrivals."""
        config = draw_config(_DataDraw(data))
        self.world = self.bench(config, seed=config.num_blocks)
        type(self).last_world = self.world
        for _ in range(data.draw(st.integers(1, 3), label="arrivals")):
            self.a_request_arrives_now(data)

    def bench(self, config: WorldConfig, seed: int) -> World:
        variant = type(self).variant
        return World(config, seed=seed, bank_rows=31, **(variant.options() if variant else {}))

    def a_request_arrives_now(self, data: st.DataObject) -> None:
        """T within A0, beyond it by up to the pool, up to twice A0, or up to three pools (d <= pool: the
        geometry's rule, so every range is non-empty and the last reaches past A0 plus the pool)."""
        config = self.world.config
        d, pool = config.default_alloc_tokens, config.num_blocks * config.block_size
        lengths = [st.integers(1, d), st.integers(d + 1, d + pool), st.integers(d + 1, 2 * d), st.integers(1, 3 * pool)]
        total = data.draw(st.one_of(lengths), label="T")
        kind = data.draw(st.sampled_from(["plain", "progress", "plain", "progress", "warm-up"]), label="kind")
        checksum = data.draw(st.booleans(), label="checksum")
        self.world.arrive(
            self.next_room, total, progress=kind == "progress", warmup=kind == "warm-up", checksum=checksum
        )
        self.next_room += 1

    # ---- views of the world, in a stable order ----------------------------------------------------

    def _seen(self) -> dict[Any, Any]:
        """Views computed since the last event: every rule's precondition asks for some between two events,
        and the world changes only through events (each bumps its version)."""
        version = self.world.version
        if getattr(self, "_seen_at", None) != version:
            self._seen_at, self._views = version, {}
        return self._views

    def _requests(self, *states: State) -> list[ReceiverRequest]:  # type: ignore[type-arg]
        views = self._seen()
        if states not in views:
            ordered = sorted(self.world.queue, key=lambda r: r.room)
            views[states] = [r for r in ordered if not states or r.state in states]
        return views[states]  # type: ignore[no-any-return]

    def _live(self) -> list[ReceiverRequest]:  # type: ignore[type-arg]
        return [r for r in self._requests() if r.state not in (State.SUCCESS, State.FAILED)]

    def _with_pending_chunk(self) -> list[int]:
        """Rooms the sender still has a chunk for, whatever the receiver thinks of them: after an abort the
        sender may land one more chunk before it acts on the abort."""
        sender = self.world.sender
        return [room for room in sorted(sender.rooms()) if sender.pending(room) is not None]

    def _with_abort_queued(self) -> list[int]:
        return [room for room in sorted(self.world.sender.rooms()) if self.world.sender.abort_queued(room)]

    def _with_history(self) -> list[int]:
        return [r.room for r in self._live() if self.world.sender.published(r.room)]

    # ---- rules ------------------------------------------------------------------------------------

    @precondition(lambda self: len(self._live()) < MAX_LIVE)
    @rule(data=st.data())
    def a_request_arrives(self, data: st.DataObject) -> None:
        self.a_request_arrives_now(data)

    @rule()
    def a_scheduler_iteration(self) -> None:
        self.world.step()

    @precondition(lambda self: bool(self._with_pending_chunk()))
    @rule(data=st.data(), partial=st.one_of(st.none(), st.integers(1, 8)))
    def the_sender_lands_a_chunk(self, data: st.DataObject, partial: int | None) -> None:
        """A whole chunk lands and its status is published, or only some blocks land (still in flight)."""
        self.world.deliver(data.draw(st.sampled_from(self._with_pending_chunk()), label="room"), blocks=partial)

    @precondition(lambda self: bool(self._with_abort_queued()))
    @rule(data=st.data())
    def the_sender_acts_on_an_abort(self, data: st.DataObject) -> None:
        """The abort message reaches the sender: it drops its pending chunk and acknowledges."""
        self.world.stop(data.draw(st.sampled_from(self._with_abort_queued()), label="room"))

    @rule(iterations=st.integers(1, 3))
    def the_world_moves_on(self, iterations: int) -> None:
        """Every pending chunk lands and the scheduler runs: the fair schedule under which all must end."""
        for _ in range(iterations):
            for room in self._with_pending_chunk():
                self.world.deliver(room)
            self.world.step()

    @precondition(lambda self: bool(self._with_history()))
    @rule(data=st.data())
    def a_status_arrives_again(self, data: st.DataObject) -> None:
        """A status message the sender sent earlier is delivered again, or late (after a newer one)."""
        room = data.draw(st.sampled_from(self._with_history()), label="room")
        status = data.draw(st.sampled_from(self.world.sender.published(room)), label="status")
        self.world.late_status(room, status)

    @precondition(lambda self: bool(self._live()))
    @rule(
        data=st.data(),
        fault=st.sampled_from(
            ["sender fails", "client aborts", "aux corrupted", "sender dies", "data corrupted", "status goes backwards"]
        ),
    )
    def something_goes_wrong(self, data: st.DataObject, fault: str) -> None:
        """One request meets a failing or silently dead sender, an impatient client, or an impossible aux row."""
        room = data.draw(st.sampled_from([r.room for r in self._live()]), label="room")
        if fault == "sender fails":
            self.world.fail(room)
        elif fault == "client aborts":
            self.world.abort(room)
        elif fault == "sender dies":
            self.world.kill(room)
        elif fault == "data corrupted":
            self.world.corrupt_data(room)
        elif fault == "status goes backwards":
            self.world.go_backwards(room)
        else:
            self.world.corrupt_aux(room, data.draw(IMPOSSIBLE_TOTALS, label="T"))

    @precondition(lambda self: bool(self._live()))
    @rule(data=st.data(), status=ANY_STATUS)
    def a_status_that_cannot_be(self, data: st.DataObject, status: int) -> None:
        """The next poll answers a value outside KVPoll, a premature or backwards status, or a stale one;
        the world refuses a lie the receiver could not tell from the truth."""
        room = data.draw(st.sampled_from([r.room for r in self._live()]), label="room")
        self.world.misreport(room, status, **self._some_ranks(data))

    @precondition(lambda self: bool(self._first_chunk_unread()))
    @rule(data=st.data(), value=st.one_of(IMPOSSIBLE_TOTALS, st.integers(1, 64)))
    def the_sender_misstates_its_total(self, data: st.DataObject, value: int) -> None:
        """A wrong T in A0[0]: impossible, or plausible but at odds with the status or the checksum."""
        room = data.draw(st.sampled_from(self._first_chunk_unread()), label="room")
        self.world.corrupt_aux(room, value, **self._some_ranks(data))

    @precondition(lambda self: bool(self._with_progress()))
    @rule(data=st.data(), delta=st.integers(-8, 8).filter(bool))
    def the_sender_miscounts_what_landed(self, data: st.DataObject, delta: int) -> None:
        room = data.draw(st.sampled_from(self._with_progress()), label="room")
        self.world.misreport_landed(room, delta, **self._some_ranks(data))

    @precondition(lambda self: bool(self._requests(State.FAILED) or self._live()))
    @rule(data=st.data(), call=st.sampled_from(LINK_CALLS))
    def a_link_breaks(self, data: st.DataObject, call: str) -> None:
        """The link's poll, init or resume raises from now on, as over a dead socket."""
        rooms = [r.room for r in self._requests(State.FAILED) + self._live() if not r.warmup]
        if rooms:
            self.world.break_link(data.draw(st.sampled_from(rooms), label="room"), call, **self._some_ranks(data))

    @precondition(lambda self: bool(self._requests(State.SUCCESS, State.FAILED)))
    @rule(data=st.data())
    def the_client_aborts_an_ended_request(self, data: st.DataObject) -> None:
        """An abort that arrives after the end (held, fencing, or already gone) changes nothing."""
        ended = [r.room for r in self._requests(State.SUCCESS, State.FAILED)]
        self.world.abort(data.draw(st.sampled_from(ended), label="room"))

    def _some_ranks(self, data: st.DataObject) -> dict[str, Any]:
        """On one rank the event reaches the world; on several, the ranks it reaches (see MultiRankProtocol)."""
        return {}

    def _with_progress(self) -> list[int]:
        return [r.room for r in self._live() if self.world.sender.has_progress(r.room)]

    def _first_chunk_unread(self) -> list[int]:
        return [r.room for r in self._live() if self.world.first_chunk_unread(r.room)]

    @rule(seconds=st.sampled_from([0.5, 5.0, 30.0, 61.0]))
    def time_passes(self, seconds: float) -> None:
        self.world.advance(seconds)

    @precondition(lambda self: bool(self._requests(State.SUCCESS)))
    @rule(data=st.data())
    def the_caller_releases(self, data: st.DataObject) -> None:
        self.world.release(data.draw(st.sampled_from([r.room for r in self._requests(State.SUCCESS)]), label="room"))

    def teardown(self) -> None:
        if not hasattr(self, "world"):
            return
        outcomes = list(self.world.outcomes.values())
        event("requests", len(outcomes))
        resumed = sum(o.resumes > 0 for o in outcomes)
        event("resumed", resumed)
        target(resumed, label="resumed requests")
        self.world.drain()
        event("ended in SUCCESS", sum(o.states[-1] is State.SUCCESS for o in outcomes))
        violations = self.world.check()
        assert not violations, violations
        assert self.world.allocator.free_count == self.world.config.num_blocks


class MultiRankProtocol(ReceiverProtocol):
    """The same protocol on tensor-parallel ranks, each with its own pool, kept in lockstep by the
    controller's collectives; statuses, clocks and aux rows may differ between ranks, as they do."""

    world: ReplicaWorld  # type: ignore[assignment]
    ranks: ClassVar[int] = 2

    def bench(self, config: WorldConfig, seed: int) -> ReplicaWorld:  # type: ignore[override]
        variant = type(self).variant
        world = ReplicaWorld(
            config,
            type(self).ranks,
            seed=seed,
            bank_rows=31,
            **(variant.options() if variant else {}),
        )
        if variant is not None and variant.rig is not None:
            variant.rig(world)
        return world

    def _rank(self, data: st.DataObject) -> list[int]:
        return [data.draw(st.integers(0, type(self).ranks - 1), label="rank")]

    def _some_ranks(self, data: st.DataObject) -> dict[str, Any]:
        if data.draw(st.booleans(), label="every rank"):
            return {}
        return {"ranks": self._rank(data)}

    @precondition(lambda self: bool(self._live()))
    @rule(data=st.data(), fault=st.sampled_from(["fails", "dies"]))
    def one_rank_sender_fails_or_dies(self, data: st.DataObject, fault: str) -> None:
        """The sender serving one rank fails, or dies silently; the others' go on."""
        room = data.draw(st.sampled_from([r.room for r in self._live()]), label="room")
        (self.world.fail if fault == "fails" else self.world.kill)(room, ranks=self._rank(data))

    @precondition(lambda self: bool(self._with_abort_queued()))
    @rule(data=st.data())
    def one_rank_sender_acts_on_an_abort(self, data: st.DataObject) -> None:
        """One rank's sender acknowledges the abort: a fence must wait for every rank's."""
        room = data.draw(st.sampled_from(self._with_abort_queued()), label="room")
        self.world.stop(room, ranks=self._rank(data))

    @precondition(lambda self: bool(self._with_pending_chunk()))
    @rule(data=st.data())
    def one_rank_sees_a_chunk_first(self, data: st.DataObject) -> None:
        """The chunk lands and its status reaches one rank; the others see it at a later landing."""
        room = data.draw(st.sampled_from(self._with_pending_chunk()), label="room")
        self.world.deliver(room, ranks=self._rank(data))

    def _first_chunk_unread(self) -> list[int]:  # type: ignore[override]
        """Rooms whose first chunk landed on every rank and is not read yet."""
        return [r.room for r in self._live() if all(w.first_chunk_unread(r.room) for w in self.world.ranks)]

    @precondition(lambda self: bool(self._first_chunk_unread()))
    @rule(data=st.data(), value=st.sampled_from([0, 1, -1, MAX_TOTAL + 1]))
    def one_rank_reads_another_aux(self, data: st.DataObject, value: int) -> None:
        """One rank finds another T in its A0[0] (#4: some ranks read aux 0)."""
        room = data.draw(st.sampled_from(self._first_chunk_unread()), label="room")
        self.world.corrupt_aux(room, value, ranks=self._rank(data))

    @precondition(lambda self: bool(self._live()))
    @rule(data=st.data())
    def one_rank_gets_bad_data(self, data: st.DataObject) -> None:
        """A value flips in a landed chunk on one rank only (checksummed rooms): the ranks must not part."""
        room = data.draw(st.sampled_from([r.room for r in self._live()]), label="room")
        self.world.corrupt_data(room, ranks=self._rank(data))

    @rule(data=st.data(), seconds=st.sampled_from([5.0, 61.0]))
    def one_rank_clock_runs_ahead(self, data: st.DataObject, seconds: float) -> None:
        self.world.advance(seconds, ranks=self._rank(data))


def protocol_for(variant: Variant | None, ranks: int = 1) -> type[ReceiverProtocol]:
    base = ReceiverProtocol if ranks == 1 else MultiRankProtocol
    if variant is None and ranks == 1:
        return base
    name = "Protocol_" + re.sub(r"\W", "_", variant.name if variant else "ranks") + f"_{ranks}"
    return type(name, (base,), {"variant": variant, "last_world": None, "ranks": ranks})


@dataclass(frozen=True, slots=True)
class Catch:
    """How the fuzzer caught a variant: the first invariant or guard that spoke, and the minimal program."""

    variant: str
    caught: bool
    by: str
    violation: str
    steps: int
    seconds: float
    scenario: dict[str, Any] | None


def hunt(variant: Variant, options: settings | None = None) -> Catch:
    """Fuzz ``variant`` until it breaks an invariant; report what caught it and the shrunk schedule."""
    protocol = protocol_for(variant, variant.ranks)
    started = time.perf_counter()
    try:
        run_state_machine_as_test(protocol, settings=options)
    except Exception as error:  # the failure *is* the result here
        world = protocol.last_world
        found = world.check() if world is not None else []  # on several ranks, every rank's judge speaks
        first = found[0] if found else _first_violation(error)
        return Catch(
            variant=variant.name,
            caught=True,
            by=catch_label(first),
            violation=first,
            steps=_program_length(error),
            seconds=round(time.perf_counter() - started, 2),
            scenario=world.scenario(variant=variant.name, bug=variant.bug) if world is not None else None,
        )
    return Catch(variant.name, False, "-", "", 0, round(time.perf_counter() - started, 2), None)


def _first_violation(error: BaseException) -> str:
    """The first message of the violation list an invariant asserted on (quoted either way by repr)."""
    text = str(error)
    with contextlib.suppress(ValueError, SyntaxError):
        found = ast.literal_eval(text[text.index("[") :])
        if isinstance(found, list) and found:
            return str(found[0])
    return f"{type(error).__name__}: {error}"


def _program_length(error: BaseException) -> int:
    """Rule calls in the shrunk program Hypothesis printed (invariant checks and teardown excluded)."""
    notes = "\n".join(getattr(error, "__notes__", []))
    calls = re.findall(r"^state\.(\w+)\(", notes, re.MULTILINE)
    return sum(1 for name in calls if not INVARIANT_NAME.fullmatch(name) and name != "teardown")
