"""Many requests, one scheduler iteration at a time: poll all, dispatch, allocate in FIFO order, collect.

The queue is what a serving system calls once per scheduler iteration. It owns the one shared Machine,
admits and retires models, and runs the allocation pass in which blocks are granted head-of-line, so
that a request that cannot be served yet also holds back the ones behind it (SGLang's policy), with
requests that already started (waiting for their remainder) ahead of new admissions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic

from transitions import Machine

from .errors import Aborted, PoolTooSmall, Room
from .kvpoll import KVPoll
from .machine import build_machine
from .ports import BlockAllocator, BlockBuffers, Clock, MonotonicClock, PayloadT, RankGroup, SingleRank, TransportLink
from .request import ReceiverConfig, ReceiverRequest, Wiring, deadlines, poll_table
from .spec import ReceiverSpec, load_spec
from .states import State

_ALLOCATION_ORDER = (State.WAITING_FOR_BLOCKS, State.WAITING_FOR_INPUT)


class ReceiverQueue(Generic[PayloadT]):
    def __init__(
        self,
        buffers: BlockBuffers[PayloadT],
        allocator: BlockAllocator,
        config: ReceiverConfig | None = None,
        *,
        ranks: RankGroup | None = None,
        clock: Clock | None = None,
        spec: ReceiverSpec | None = None,
        request_class: type[ReceiverRequest[PayloadT]] = ReceiverRequest,
    ) -> None:
        if buffers.block_size != allocator.block_size:
            raise ValueError(f"buffers have B={buffers.block_size}, allocator B={allocator.block_size}")
        spec = spec or load_spec()
        config = config or ReceiverConfig()
        self._clock: Clock = clock or MonotonicClock()
        self._wiring = Wiring(spec, poll_table(spec), buffers, allocator, config, self._clock, deadlines(spec, config))
        self._machine: Machine = build_machine(spec, request_class)
        self._request_class = request_class
        self._ranks: RankGroup = ranks or SingleRank()
        self._live: dict[Room, ReceiverRequest[PayloadT]] = {}
        self._held: dict[Room, ReceiverRequest[PayloadT]] = {}

    # ---- admission and retirement ----------------------------------------------------------------

    def add(self, room: Room, link: TransportLink, *, warmup: bool = False) -> ReceiverRequest[PayloadT]:
        """Track a new request; a ``warmup`` one (a health check) takes no blocks and reads nothing."""
        if room in self._live or room in self._held:
            raise ValueError(f"room {room} is already in the queue")
        request = self._request_class(room, link, self._wiring, warmup=warmup)
        self._machine.add_model(request)
        self._live[room] = request
        return request

    def abort(self, room: Room) -> bool:
        """Fail a live request on the client's behalf; False when it has already finished."""
        request = self._live.get(room)
        if request is None or request.state in self._wiring.spec.terminal:
            return False
        request.fire("fail", error=Aborted(room, "aborted by the client"))
        return True

    def release(self, room: Room) -> None:
        """The caller is done with a successful request: its blocks return to the pool."""
        request = self._held.pop(room)
        request.fire("release")
        self._machine.remove_model(request)

    # ---- the scheduler iteration -----------------------------------------------------------------

    def step(self) -> list[ReceiverRequest[PayloadT]]:
        """One iteration; returns the requests that ended in it (SUCCESS ones are held until released)."""
        polled = [r for r in self._live.values() if r.state not in self._wiring.spec.terminal]
        reduced = self._ranks.min_reduce([_poll(r) for r in polled])
        now = self._clock.now()
        terminal = self._wiring.spec.terminal
        for request, value in zip(polled, reduced, strict=True):
            request.on_poll(value)  # a status that arrived in time wins over the deadline
            if request.state not in terminal:
                request.check_deadline(now)
        self._allocate()
        return self._collect()

    def _allocate(self) -> None:
        allocator = self._wiring.allocator
        for request in self._waiting():
            if request.is_warmup():
                request.fire("warmup_admitted")  # needs no blocks, so it neither waits nor blocks others
                continue
            wanted = request.tokens_wanted
            blocks_needed = -(-wanted // allocator.block_size)
            if request.takes_partial_grants:
                # Several rounds are possible: take what is free now, at least one block.
                wanted = min(wanted, allocator.free_count * allocator.block_size)
                if wanted == 0:
                    return
            elif blocks_needed > allocator.num_blocks:
                request.fire(
                    "fail",
                    error=PoolTooSmall(
                        request.room, f"needs {blocks_needed} blocks, the pool has {allocator.num_blocks}"
                    ),
                )
                continue
            blocks = allocator.alloc(request.room, wanted)
            if blocks is None:
                return
            request.fire("blocks_granted", blocks=blocks)

    def _waiting(self) -> Iterator[ReceiverRequest[PayloadT]]:
        for state in _ALLOCATION_ORDER:
            yield from [r for r in self._live.values() if r.state is state]

    def _collect(self) -> list[ReceiverRequest[PayloadT]]:
        finished = [r for r in self._live.values() if r.state in self._wiring.spec.terminal]
        for request in finished:
            del self._live[request.room]
            if request.state is State.SUCCESS:
                self._held[request.room] = request
            else:
                self._machine.remove_model(request)
        return finished

    # ---- views -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[ReceiverRequest[PayloadT]]:
        yield from self._live.values()
        yield from self._held.values()

    def get(self, room: Room) -> ReceiverRequest[PayloadT] | None:
        return self._live.get(room) or self._held.get(room)

    @property
    def spec(self) -> ReceiverSpec:
        return self._wiring.spec


def _poll(request: ReceiverRequest[PayloadT]) -> int:
    """A link whose poll raises has lost its sender: that request reads Failed, the others go on."""
    try:
        return request.link.poll()
    except Exception:
        return int(KVPoll.Failed)
