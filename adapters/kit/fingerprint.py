"""The canonical state of a World's parts: what the exhaustive explorer and the random walk deduplicate by.

Two states get the same fingerprint exactly when nothing that can influence what happens next, or what
the judge will say, differs: every time is taken relative to the clock, uninitialised memory is left out,
and collections are put in a form whose order means something (arrival order) or none (sorted).

Left out on purpose: the event log, the sender's write log (the judge reads only the entries of the event
at hand), the iteration counter and the lockstep digest (compared every 64 iterations, far beyond any
bound the explorer sets; the replicas judge I9 directly after every step).
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import TYPE_CHECKING

import torch

from epd_receiver.adapters.kit.concluding import LocallyConcludingLink
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.adapters.ports.sender import InProcessSender
from epd_receiver.adapters.ports.sender_links import WarmupLink
from epd_receiver.fsm import ReceiverError, ReceiverRequest, Room
from epd_receiver.fsm.window import ReadWindow

if TYPE_CHECKING:
    from epd_receiver.adapters.kit.judge import Judge
    from epd_receiver.adapters.kit.world import World


def parts_of(world: World, now: float) -> tuple[object, ...]:
    """The queue, the pool and its owners, the sender, the judge's outcomes and memory, on one rank."""
    allocator, queue = world.allocator, world.queue
    return (
        tuple(_request(r, now) for r in queue),  # live, then held, then fencing: how many live, which fence
        len(queue),
        queue.fenced_rooms,
        allocator.free_list(),
        tuple(sorted(allocator.owners().items())),
        tuple(sorted(allocator.fences().items())),
        allocator.rejected_frees,
        tuple(_sender_room(world.sender, room) for room in world.sender.rooms()),
        tuple(tensor_bytes(t) for t in world.pool.buffers()),
        tuple(canon(o) for o in world.outcomes.values()),
        tuple(world.violations),
        _judge_memory(world.judge, now),
    )


# What a request keeps only to report it (when it arrived and entered its state, when its fence was set, the
# state it failed from): no guard or action reads them, so two states that differ
# only there have the same future and must merge.
_REPORTED_ONLY = frozenset({"arrived_at", "entered_at", "failed_in", "_fenced_at"})


def _request(request: ReceiverRequest[EmbeddingPayload], now: float) -> tuple[object, ...]:
    """Every plain attribute of the request (a variant's own included), its link, window and payload."""
    found: list[tuple[str, object]] = []
    for name, value in sorted(_attributes(request).items()):
        if name in _REPORTED_ONLY:
            continue
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


def _attributes(request: object) -> dict[str, object]:
    """The request's slots that are set, and whatever its ``__dict__`` holds (a variant's own fields)."""
    names = {n for c in type(request).__mro__ for n in getattr(c, "__slots__", ()) if not n.startswith("__")}
    found = {name: getattr(request, name) for name in names if hasattr(request, name)}
    found.update(getattr(request, "__dict__", {}))
    return found


def _payload(payload: EmbeddingPayload, landed: int) -> tuple[object, ...]:
    """The tokens assembled so far; the rest of the output is uninitialised memory, which must not make
    two equal states look different."""
    tensors = [payload.embeddings[:landed], payload.fill_ids[:landed], payload.mrope_positions[:, :landed]]
    if payload.deepstack is not None:
        tensors.append(payload.deepstack[:landed])
    return (payload.total_tokens, payload.mrope_delta, *(tensor_bytes(t) for t in tensors))


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def _sender_room(sender: InProcessSender, room: Room) -> tuple[object, ...]:
    """The sender's record of a room (status, pending chunk, messages, stopped, dead, a faulty sender's
    next answer, ...) and the statuses it published as the receiver can see them: once each, since a
    repeat changes nothing."""
    record = sender.room_record(room)
    return (room, *(canon(value) for value in record.values()), tuple(sender.published(room)))


def canon(value: object) -> object:
    """A hashable, order-faithful form: sets sorted, lists, dicts (in insertion order, which is arrival
    order, the order the allocation pass follows) and dataclasses as tuples."""
    if isinstance(value, set | frozenset):
        return tuple(sorted((canon(v) for v in value), key=repr))
    if isinstance(value, dict):
        return tuple((k, canon(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return tuple(canon(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return tuple(canon(getattr(value, f.name)) for f in dataclasses.fields(value))
    return value


# The judge's notes of one iteration (the next starts them afresh), and what is taken separately.
_JUDGE_SCRATCH = frozenset({"world", "outcomes", "violations", "entered", "fair", "timed_out", "lifted"})


def _judge_memory(judge: Judge, now: float) -> tuple[object, ...]:
    """What the judge remembers between events: when each room entered its state (I8, I13), and every
    other note of its (rooms that must fail, I10; that a fault touched, I12; whose sender died, ...)."""
    notes = tuple((name, canon(value)) for name, value in sorted(vars(judge).items()) if name not in _JUDGE_SCRATCH)
    return tuple(sorted((room, now - t) for room, t in judge.entered.items())), notes
