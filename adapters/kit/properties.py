"""Properties beyond safety: good requests succeed, deadlines are exact, the pool is served in order.

A controller can keep every block owned and every byte right and still be wrong: it may fail a request
that should have succeeded, fire a deadline before its time, or hand blocks to a newcomer while the head
of the line waits. Each function here judges one such property from what the world did to the request
(its sender's faults, the clocks, the messages the sender received, the free blocks) and never from the
controller's own bookkeeping. The judge calls them at the moments named in their docstrings; on several
ranks the replicas judge what needs every rank's clock once every rank has stepped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.fsm import ReceiverRequest, Room, State, TimedOut, load_spec

if TYPE_CHECKING:
    from epd_receiver.adapters.kit.judge import Judge

Request = ReceiverRequest[EmbeddingPayload]
# The order the pool serves waiting requests in, as the packaged spec declares it (remainders first): the
# reference, never the order of the spec a variant runs with, whose deviation is what is being judged.
_WAITING = load_spec().allocation_order


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def entitled(judge: Judge, room: Room) -> bool:
    """The request had all it needs to succeed: no fault touched it, its sender agrees on B, T is possible,
    and the pool can hold A0 and, without progress, the whole remainder (with progress, rounds of any size).
    """
    config = judge.world.config
    if not judge.honest or room in judge.faulted or config.sender_block_size not in (None, config.block_size):
        return False
    outcome = judge.outcomes[room]
    if outcome.warmup:
        return True
    first = _blocks(config.default_alloc_tokens, config.block_size)
    if first > config.num_blocks or outcome.total_tokens > config.max_total_tokens:
        return False
    rest = outcome.total_tokens - first * config.block_size
    progress = judge.world.sender.has_progress(room)
    return rest <= 0 or progress or _blocks(rest, config.block_size) <= config.num_blocks


def liveness(judge: Judge, request: Request) -> list[str]:
    """I12, when a request ends FAILED: one that was entitled to succeed may fail only by a deadline (whose
    exactness I13 judges); any other failure is a good request lost."""
    if request.state is not State.FAILED or isinstance(request.error, TimedOut) or not entitled(judge, request.room):
        return []
    return [f"I12: room {request.room} had a live, honest sender and a pool that holds it, yet failed: {request.error}"]


def early_timeouts(ranks: Sequence[Judge]) -> list[str]:
    """I13, after an iteration, for each request that failed with TimedOut in it: its deadline had passed on
    some rank's clock (failing on one rank's word is the spec's choice; before any rank's is a bug). Each
    rank recorded the state it left and the time it had spent there."""
    found = []
    for room, (state, _) in ranks[0].timed_out.items():
        limit = ranks[0].world.deadlines.get(state)
        spent = [judge.timed_out[room][1] for judge in ranks if room in judge.timed_out]
        if limit is None or not any(s > limit for s in spent):
            found.append(f"I13: room {room} timed out in {state.name} after {max(spent):g} s, before its {limit} s")
    return found


def early_fence_lifts(ranks: Sequence[Judge]) -> list[str]:
    """I13, after an iteration, for each fence that lifted in it: every rank's sender gave evidence that it
    stopped (a terminal status or an acknowledged abort), or the drain deadline passed on every rank's
    clock. Anything else frees blocks a write may still be on its way into."""
    drain = ranks[0].world.receiver_config.drain_timeout_s
    found = []
    for room in ranks[0].lifted:
        for judge in ranks:
            if not judge.world.sender.writes_stopped(room) and (drain is None or not judge.overstayed(room, drain)):
                found.append(
                    f"I13: room {room}'s fence lifted before the drain deadline, with no evidence its sender stopped"
                )
                break
    return found


def allocation_order(judge: Judge, sent_before: Mapping[Room, int]) -> list[str]:
    """I14, after each iteration: the head of the allocation order waits only for lack of blocks, and no
    request was granted blocks ahead of it (remainders before admissions, first come first served in each).

    ``sent_before`` counts the messages each room's sender had received before the iteration: a new init
    or resume is a grant made by this iteration's allocation pass.
    """
    world = judge.world
    order = list(judge.outcomes)  # arrival order
    waiting = sorted(
        (r for r in world.queue if r.state in _WAITING),
        key=lambda r: (_WAITING.index(r.state), order.index(r.room)),
    )
    if not waiting:
        return []
    head = waiting[0]
    need = _need(judge, head)
    free = world.allocator.free_count
    found = []
    if need <= free:
        found.append(
            f"I14: room {head.room} waits at the head of the allocation order for {need} blocks with {free} free"
        )
    head_at = (_WAITING.index(head.state), order.index(head.room))
    for grant in _granted(judge, sent_before):
        if (0 if grant.kind == "resume" else 1, order.index(grant.room)) > head_at:
            found.append(f"I14: room {grant.room} was granted blocks ahead of room {head.room}, first in line")
    return found


def _need(judge: Judge, request: Request) -> int:
    """Blocks the head's next grant takes: none for a warm-up, A0 for an admission, the remainder (one block
    when its sender reports progress) for a resume."""
    world = judge.world
    config = world.config
    if request.warmup:
        return 0
    if request.state is State.WAITING_FOR_INPUT:
        return _blocks(config.default_alloc_tokens, config.block_size)
    if world.sender.has_progress(request.room):
        return 1
    rest = judge.outcomes[request.room].total_tokens - world.sender.sent_tokens(request.room)
    return _blocks(rest, config.block_size)


class _Grant(NamedTuple):
    room: Room
    kind: str  # "init" (an admission) or "resume" (a remainder)


def _granted(judge: Judge, sent_before: Mapping[Room, int]) -> list[_Grant]:
    sender = judge.world.sender
    return [
        _Grant(room, message.kind)
        for room in sender.rooms()
        for message in sender.room_messages(room)[sent_before.get(room, 0) :]
    ]
