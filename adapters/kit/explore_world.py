"""What the exhaustive explorer needs of a World: its vocabulary, what is enabled, and a fingerprint.

The explorer (``explore.py``) walks every interleaving of the events below on the real controller. To do
that it must know, in each state, which events make sense (the fuzzer's preconditions; an event the World
refuses, by returning False, is no transition), and must tell two states apart exactly when something
that can influence the future, or the judge's verdict, differs (the fingerprint). Both are computed from
outside the World, from what it and its parts hold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeAlias

import torch

from epd_receiver.adapters.kit.concluding import LocallyConcludingLink
from epd_receiver.adapters.kit.replicas import ReplicaWorld
from epd_receiver.adapters.kit.world import World, WorldConfig
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.adapters.ports.sender import WarmupLink
from epd_receiver.fsm import KVPoll, ReceiverError, ReceiverRequest, State
from epd_receiver.fsm.window import ReadWindow

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
    now, drain = world.clock.now(), world.receiver_config.drain_timeout_s
    ahead = [r.deadline_at - now for r in world.queue if math.isfinite(r.deadline_at)]
    if drain is not None:
        for room in world.sender.rooms():
            if world.sender.abort_queued(room) or world._unheard_abort(room):
                ahead.append(drain - (now - world._abort_heard.get(room, now)))
    return sorted({math.floor(s) + 1 for s in ahead if s >= 0})


# ---- the fingerprint ----------------------------------------------------------------------------------


def fingerprint(world: Bench) -> tuple[object, ...]:
    """Everything that can influence what happens next or what the judge will say, with every time taken
    relative to the clock: equal fingerprints, equal futures.

    Left out on purpose: the event log, the sender's write log (the judge reads only the entries of the
    event at hand), the iteration counter and the lockstep digest (compared every 64 iterations, far
    beyond any bound here; the replicas judge I9 directly after every step).
    """
    if isinstance(world, ReplicaWorld):
        return (tuple(_one_rank(w) for w in world.ranks), tuple(world.violations))
    return _one_rank(world)


def _one_rank(world: World) -> tuple[object, ...]:
    now, allocator, queue = world.clock.now(), world.allocator, world.queue
    return (
        tuple(_request(r, now) for r in queue),  # live, then held, then fencing: how many live, which fence
        len(queue),
        queue.fenced_rooms,
        allocator.free_list(),
        tuple(sorted(allocator.owners().items())),
        tuple(sorted(allocator.fences().items())),
        allocator.rejected_frees,
        tuple(_sender_room(world, room) for room in world.sender.rooms()),
        tuple(_tensor_bytes(t) for t in world.pool.buffers()),
        tuple(_canon(o) for o in world.outcomes.values()),
        tuple(world.violations),
        _judge_memory(world, now),
    )


def _request(request: Request, now: float) -> tuple[object, ...]:
    """Every plain attribute of the request (a variant's own included), its link, window and payload."""
    found: list[tuple[str, object]] = []
    for name, value in sorted(vars(request).items()):
        if name == "deadline_at":
            found.append((name, value - now))
        elif isinstance(value, int | float | str | bool | Enum | tuple) or value is None:
            found.append((name, value))
        elif isinstance(value, ReceiverError):
            found.append((name, (type(value).__name__, str(value))))
        elif isinstance(value, EmbeddingPayload):
            found.append((name, _payload(value, request.landed)))
        elif isinstance(value, ReadWindow):
            found.append((name, (value._aux_block, value._aux_spent, value._data_blocks)))
        elif isinstance(value, LocallyConcludingLink):
            found.append((name, (value.aborted, value.concluded)))
        elif isinstance(value, WarmupLink):
            found.append((name, tuple(value.inits)))
    return tuple(found)


def _payload(payload: EmbeddingPayload, landed: int) -> tuple[object, ...]:
    """The tokens assembled so far; the rest of the output is uninitialised memory, which must not make
    two equal states look different."""
    tensors = [payload.embeddings[:landed], payload.fill_ids[:landed], payload.mrope_positions[:, :landed]]
    if payload.deepstack is not None:
        tensors.append(payload.deepstack[:landed])
    return (payload.total_tokens, payload.mrope_delta, *(_tensor_bytes(t) for t in tensors))


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def _sender_room(world: World, room: int) -> tuple[object, ...]:
    """The sender's record of a room (status, pending chunk, messages, stopped, dead, a faulty sender's
    next answer, ...) but the source, which the room's seed and total determine, and the statuses it
    published as the receiver can see them: once each, since a repeat changes nothing."""
    record = world.sender._rooms[room]
    fields = (f.name for f in dataclasses.fields(record) if f.name not in ("source", "published"))
    return (room, *(_canon(getattr(record, name)) for name in fields), tuple(world.sender.published(room)))


def _canon(value: object) -> object:
    """A hashable, order-faithful form: sets sorted, lists, dicts (in insertion order, which is arrival
    order, the order the allocation pass follows) and dataclasses as tuples."""
    if isinstance(value, set | frozenset):
        return tuple(sorted((_canon(v) for v in value), key=repr))
    if isinstance(value, dict):
        return tuple((k, _canon(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return tuple(_canon(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return tuple(_canon(getattr(value, f.name)) for f in dataclasses.fields(value))
    return value


# The judge's notes of one iteration (the next starts them afresh), and what is taken separately.
_JUDGE_SCRATCH = frozenset({"world", "outcomes", "violations", "entered", "fair", "timed_out", "lifted"})


def _judge_memory(world: World, now: float) -> tuple[object, ...]:
    """What the judge and the world remember between events: when each room entered its state (I8, I13),
    every other note of the judge's (rooms that must fail, I10; that a fault touched, I12; whose sender
    died, ...), which aborts the sender heard and when (the drain contract), which chunks were flipped,
    and what each locally concluding link concluded (it outlives its request: a late write still lands)."""
    judge = world.judge
    notes = tuple((name, _canon(value)) for name, value in sorted(vars(judge).items()) if name not in _JUDGE_SCRATCH)
    return (
        tuple(sorted((room, now - t) for room, t in judge.entered.items())),
        notes,
        tuple(sorted((room, now - t) for room, t in world._abort_heard.items())),
        tuple(sorted(world._corrupted)),
        tuple((room, link.aborted, link.concluded) for room, link in world._concluding.items()),
    )
