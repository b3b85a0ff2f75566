"""What the exhaustive explorer needs of a World: its vocabulary, what is enabled, and a fingerprint.

The explorer (``explore.py``) walks every interleaving of the events below on the real controller. To do
that it must know, in each state, which events make sense (the fuzzer's preconditions; an event the World
refuses, by returning False, is no transition), and must tell two states apart exactly when something
that can influence the future, or the judge's verdict, differs (the fingerprint). What is enabled is
read from outside the World, from what it and its parts tell; the fingerprint is the World's own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

from epd_receiver.adapters.kit.replicas import ReplicaWorld
from epd_receiver.adapters.kit.world import World
from epd_receiver.adapters.kit.world_config import WorldConfig
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.fsm import KVPoll, ReceiverRequest, State

Bench: TypeAlias = World | ReplicaWorld
Request: TypeAlias = ReceiverRequest[EmbeddingPayload]
Options: TypeAlias = tuple[tuple[str, Any], ...]


# ---- arrivals -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kind:
    """One arrival of the menu; its total is derived from the geometry, so that it means the same in any
    small world."""

    name: str
    total: Callable[[WorldConfig], int]
    progress: bool = False
    warmup: bool = False
    checksum: bool = False


def first_capacity(config: WorldConfig) -> int:
    """Tokens the first allocation holds: D rounded up to whole blocks."""
    return -(-config.default_alloc_tokens // config.block_size) * config.block_size


def _beyond_the_pool(config: WorldConfig) -> int:
    """A0 and then more than the whole pool: no single resume can hold the remainder."""
    return first_capacity(config) + config.num_blocks * config.block_size + 1


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        # lands whole in A0; checksummed, so that a corrupt chunk can be noticed
        Kind("fits", lambda c: c.default_alloc_tokens, checksum=True),
        # one token past A0: one resume of one block
        Kind("resume", lambda c: first_capacity(c) + 1, checksum=True),
        # larger than the pool, yet its remainder fits the whole pool once A0 is given back (#24's case)
        Kind("big", lambda c: first_capacity(c) + c.num_blocks * c.block_size),
        # PoolTooSmall without progress, and several rounds with it
        Kind("huge", _beyond_the_pool),
        Kind("rounds", _beyond_the_pool, progress=True),
        Kind("warmup", lambda c: 1, warmup=True),
    )
}


# ---- events -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One call of the World's vocabulary (on several ranks, ``ranks`` names those it reaches)."""

    method: str
    args: tuple[Any, ...] = ()
    options: Options = ()

    def apply(self, world: Bench) -> bool:
        """Apply it; False when the World refused it (nothing happened but the log and the fault mark)."""
        return getattr(world, self.method)(*self.args, **dict(self.options)) is not False


EVENTS_ALL = frozenset(
    {
        "arrive",
        "step",
        "deliver",
        "stop",
        "release",
        "abort",
        "fail",
        "kill",
        "go_backwards",
        "late_status",
        "corrupt_aux",
        "corrupt_data",
        "advance",
    }
)


# The rest of the fault vocabulary: lies about status and progress, links that raise, an abort after the
# end. Not in the standard worlds' vocabulary (their bounds were chosen without them); the random walk
# uses them, and a world may name them.
EVENTS_FAULTS = frozenset({"misreport", "misreport_landed", "break_link", "abort_ended"})
# A few values of each: outside KVPoll above and below, Failed, and each status (the World keeps only
# those the receiver can tell, or that are harmless).
MISREPORTS = (-1, 0, 1, 2, 3, 4, 9)
LANDED_ERRORS = (-1, 1)


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """The arrivals a small world offers, how many requests may arrive, the events it uses (World's method
    names), and the impossible totals a corrupt aux row may carry."""

    kinds: tuple[str, ...]
    requests: int
    events: frozenset[str] = EVENTS_ALL
    corrupt_totals: tuple[int, ...] = (0,)

    def without(self, *methods: str) -> Vocabulary:
        return dataclasses.replace(self, events=self.events - set(methods))


def enabled(world: Bench, vocabulary: Vocabulary) -> list[Event]:
    """The events of the vocabulary that make sense now, in a fixed order (a search is deterministic)."""
    rank0 = _ranks(world)[0]
    events = [*_arrivals(world, vocabulary), Event("step")]
    for room in sorted(rank0.sender.rooms()):
        events += _sender_events(world, room)
    for request in sorted(world.queue, key=lambda r: r.room):
        events += _request_events(world, request, vocabulary)
    for options, worlds in _reaches(world):
        events += [Event("advance", (s,), options) for s in _advances(worlds[0])]
    return [event for event in events if event.method in vocabulary.events]


def _ranks(world: Bench) -> list[World]:
    return list(world.ranks) if isinstance(world, ReplicaWorld) else [world]


def _reaches(world: Bench) -> list[tuple[Options, list[World]]]:
    """Whom an event may reach: every rank, or (with several) one rank alone, as a status or a clock or a
    corrupt row does in a real server."""
    ranks = _ranks(world)
    alone = [((("ranks", (r,)),), [ranks[r]]) for r in range(len(ranks))] if len(ranks) > 1 else []
    return [((), ranks), *alone]


def _arrivals(world: Bench, vocabulary: Vocabulary) -> Iterator[Event]:
    room = len(world.outcomes)  # rooms are numbered in arrival order
    if room >= vocabulary.requests:
        return
    for kind in (KINDS[name] for name in vocabulary.kinds):
        flags = (("progress", kind.progress), ("warmup", kind.warmup), ("checksum", kind.checksum))
        yield Event("arrive", (room, kind.total(world.config)), tuple(f for f in flags if f[1]))


def _sender_events(world: Bench, room: int) -> list[Event]:
    """Landings (whole, or only some blocks: still in flight), on every rank or one alone, and acting on
    an abort."""
    ranks = _ranks(world)
    chunks = [w.sender.pending(room) for w in ranks if _can_land(w, room)]
    events = []
    if chunks:
        events.append(Event("deliver", (room,)))
        events += [Event("deliver", (room, k)) for k in range(1, max(len(c.blocks) for c in chunks if c))]
    if len(chunks) > 1:  # more than one rank still to land it: one may see it first
        events += [Event("deliver", (room,), options) for options, [w] in _reaches(world)[1:] if _can_land(w, room)]
    if any(w.sender.abort_queued(room) for w in ranks):
        events.append(Event("stop", (room,)))
    return events


def _can_land(world: World, room: int) -> bool:
    sender = world.sender
    return sender.pending(room) is not None and not sender.is_dead(room) and sender.status(room) is not KVPoll.Failed


def _request_events(world: Bench, request: Request, vocabulary: Vocabulary) -> list[Event]:
    room, sender = request.room, _ranks(world)[0].sender
    ended = [Event("abort", (room,))] if "abort_ended" in vocabulary.events else []
    if request.state is State.SUCCESS:
        return ended + ([] if world.outcomes[room].released else [Event("release", (room,))])
    if request.state is State.FAILED:
        return ended
    events = [Event("abort", (room,))]
    if room not in sender.rooms():  # a warm-up: its stand-in sender takes no faults
        return events
    if sender.status(room) is not KVPoll.Failed:
        events += [Event("fail", (room,)), Event("go_backwards", (room,))]
    if not sender.is_dead(room):
        events.append(Event("kill", (room,)))
    # a status sent earlier arrives late; one that arrives again (the current one) changes nothing
    events += [Event("late_status", (room, s)) for s in sender.published(room) if s < sender.status(room)]
    for options, worlds in _reaches(world):
        if all(w.first_chunk_unread(room) for w in worlds):
            events += [Event("corrupt_aux", (room, value), options) for value in vocabulary.corrupt_totals]
        if request.state in (State.TRANSFERRING, State.RESUMING) and sender.source(room).checksum is not None:
            events.append(Event("corrupt_data", (room,), options))
        events += _lies(room, options, vocabulary)
    return events


def _lies(room: int, options: Options, vocabulary: Vocabulary) -> list[Event]:
    """The rest of the fault vocabulary, where the world names it (the World refuses what cannot apply)."""
    events = []
    if "misreport" in vocabulary.events:
        events += [Event("misreport", (room, status), options) for status in MISREPORTS]
    if "misreport_landed" in vocabulary.events:
        events += [Event("misreport_landed", (room, delta), options) for delta in LANDED_ERRORS]
    if "break_link" in vocabulary.events:
        events += [Event("break_link", (room, call), options) for call in ("poll", "init", "resume")]
    return events


def _advances(world: World) -> list[float]:
    """Seconds that take the clock just past each deadline still ahead: the controller's, and the drain
    contract of a sender with an abort to act on (World.advance lands or drops its write then)."""
    now = world.clock.now()
    ahead = [r.deadline_at - now for r in world.queue if math.isfinite(r.deadline_at)] + world.drain_ahead()
    return sorted({math.floor(s) + 1 for s in ahead if s >= 0})


# ---- the fingerprint ----------------------------------------------------------------------------------


def fingerprint(world: Bench) -> tuple[object, ...]:
    """Everything that can influence what happens next or what the judge will say: equal fingerprints,
    equal futures (``World.fingerprint``; on several ranks, every rank's and the replicas' own findings)."""
    return world.fingerprint()
