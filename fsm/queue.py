"""Many requests, one scheduler iteration at a time: poll all, dispatch, allocate in FIFO order, collect.

The queue is what a serving system calls once per scheduler iteration. It owns the one shared Machine,
admits and retires models, and runs the allocation pass in which blocks are granted head-of-line, so
that a request that cannot be served yet also holds back the ones behind it (SGLang's policy), with
requests that already started (waiting for their remainder) ahead of new admissions. A failed request
that still fences blocks stays polled, after the live ones, until its sender is known to have stopped.

With tensor-parallel ranks every rank runs its own queue over its own pool; the ranks stay in lockstep
because every input that could differ between them (the polls, the deadlines, the senders' progress and
whether each sender is done) is reduced in one collective per iteration, what they read is compared
before it is judged, and a fingerprint of their allocator operations is compared now and then.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic

from .config import ReceiverConfig, Wiring, check_pool, deadlines, poll_table
from .errors import Aborted, DuplicateRoom, PoolTooSmall, RankDivergence, Room, UnknownRoom
from .lockstep import LockstepAllocator
from .machine import build_machine
from .ports import (
    BlockAllocator,
    BlockBuffers,
    Clock,
    MonotonicClock,
    NoMetrics,
    PayloadT,
    RankGroup,
    ReceiverMetrics,
    SingleRank,
    TransportLink,
)
from .request import ReceiverRequest
from .spec import BLOCKS_GRANTED, RELEASE_EVENT, WARMUP_ADMITTED, ReceiverSpec, load_spec


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
        metrics: ReceiverMetrics | None = None,
    ) -> None:
        spec = spec or load_spec()
        config = config or ReceiverConfig()
        check_pool(config, buffers, allocator)
        self._clock: Clock = clock or MonotonicClock()
        self._ranks: RankGroup = ranks or SingleRank()
        self._lockstep = LockstepAllocator(allocator) if self._ranks.size > 1 else None
        self._machine = build_machine(spec, request_class)
        self._wiring = Wiring(
            spec,
            poll_table(spec, request_class),
            buffers,
            self._lockstep or allocator,
            config,
            self._clock,
            deadlines(spec, config),
            self._ranks,
            metrics or NoMetrics(),
            machine=self._machine,
        )
        # Counting the gauges walks every request; the default would drop them, so it is spared the walk.
        self._gauged = not isinstance(self._wiring.metrics, NoMetrics)
        # The allocation and collection passes ask the Machine's index for the requests that wait or that
        # settled, so a quiet iteration finds nothing there without looking at any request. The polled
        # requests are rebuilt only when the membership changed (an admission, a collection) or a request
        # settled between iterations (an abort): a quiet iteration costs its polls alone.
        self._members = 0  # how often the membership changed
        self._polled: list[ReceiverRequest[PayloadT]] = []
        self._polled_at = -1  # the membership count the list of polled requests was built at
        self._request_class = request_class
        self._live: dict[Room, ReceiverRequest[PayloadT]] = {}
        self._held: dict[Room, ReceiverRequest[PayloadT]] = {}
        self._fenced: dict[Room, ReceiverRequest[PayloadT]] = {}
        self._iterations = 0

    # ---- admission and retirement ----------------------------------------------------------------

    def add(self, room: Room, link: TransportLink, *, warmup: bool = False) -> ReceiverRequest[PayloadT]:
        """Track a new request; a ``warmup`` one (a health check) takes no blocks and reads nothing."""
        if room in self._live or room in self._held or room in self._fenced:
            raise DuplicateRoom(f"room {room} is already in the queue")
        request = self._request_class(room, link, self._wiring, warmup=warmup)
        self._machine.add_model(request)
        current = self._polled_at == self._members and not self._fenced and not self._machine.has_settled
        self._live[room] = request
        self._members += 1
        if current:  # the list holds every live request and nothing after them: the newcomer goes last
            self._polled.append(request)
            self._polled_at = self._members
        return request

    def abort(self, room: Room) -> bool:
        """Fail a live request on the client's behalf; False when it has already finished."""
        request = self._live.get(room)
        if request is None or request.state in self._wiring.spec.terminal:
            return False
        request.fire(self._wiring.spec.on_error, error=Aborted(room, "aborted by the client"))
        return True

    def release(self, room: Room) -> None:
        """The caller is done with a successful request: its blocks return to the pool."""
        request = self._held.pop(room, None)
        if request is None:
            where = "has not succeeded yet" if room in self._live or room in self._fenced else "is not in the queue"
            raise UnknownRoom(room, f"release of a request that {where}")
        request.fire(RELEASE_EVENT)
        self._retire(request)

    # ---- the scheduler iteration -----------------------------------------------------------------

    def step(self) -> list[ReceiverRequest[PayloadT]]:
        """One iteration; returns the requests that ended in it (SUCCESS ones are held until released)."""
        if self._polled_at != self._members or self._machine.has_settled:
            self._polled_at = self._members
            self._polled = self._to_poll()
        if self._ranks.size == 1:
            self._dispatch_local(self._polled)
        else:
            self._dispatch_reduced(self._polled)
        self._allocate()
        self._iterations += 1
        self._check_lockstep()
        finished = self._collect()
        if self._gauged:
            self._gauge()
        return finished

    def _to_poll(self) -> list[ReceiverRequest[PayloadT]]:
        """The live requests, then the fences: those of earlier iterations, then those of requests aborted
        since the last one."""
        noted: list[ReceiverRequest[PayloadT]] = self._machine.settled()
        settled = [r for r in noted if self._live.get(r.room) is r]
        if not settled:
            return [*self._live.values(), *self._fenced.values()]
        ended = {id(r) for r in settled}
        live = (r for r in self._live.values() if id(r) not in ended)
        return [*live, *self._fenced.values(), *(r for r in settled if r.fenced)]

    def _dispatch_local(self, polled: list[ReceiverRequest[PayloadT]]) -> None:
        """One rank: what it observes is what a reduce over one rank would return, so no lists are built."""
        now = self._clock.now()
        for request in polled:
            state = request.state
            request.on_local_poll(request.local_poll())
            if now > request.deadline_at and request.state is state:  # a status that arrived in time wins
                request.deadline_passed(everywhere=True)

    def _dispatch_reduced(self, polled: list[ReceiverRequest[PayloadT]]) -> None:
        """Several ranks: one collective for every input a rank could see differently, namely the polls,
        whether each deadline passed (MIN of "in time": on any rank; MIN of "past": on every rank), the
        landed counts of senders that report progress, and whether this rank's link has evidence that its
        sender is done. A link that raised contributes LINK_ERROR, below every status, so every rank fails
        that request together."""
        n = len(polled)
        now = self._clock.now()
        seen = [r.local_poll() for r in polled]
        past = [int(now > r.deadline_at) for r in polled]
        local = seen + [1 - p for p in past] + past + [r.local_landed() for r in polled]
        local += [int(r.local_writes_stopped()) for r in polled]
        reduced = self._ranks.min_reduce([r.room for r in polled], local)
        columns = [reduced[i * n : (i + 1) * n] for i in range(5)]
        for request, value, in_time, everywhere, count, stopped in zip(polled, *columns, strict=True):
            state = request.state
            request.on_poll(value, count, bool(stopped))
            if not in_time and request.state is state:  # a status that arrived in time wins
                request.deadline_passed(everywhere=bool(everywhere))

    def _check_lockstep(self) -> None:
        if self._lockstep is None or self._iterations % self._wiring.config.lockstep_every:
            return
        if not self._ranks.same([self._lockstep.digest]):
            self._wiring.metrics.rank_disagreement("allocator")
            raise RankDivergence(
                f"iteration {self._iterations}: the ranks' allocator operations differ "
                f"(this rank's fingerprint {self._lockstep.digest:#010x})"
            )

    def _allocate(self) -> None:
        allocator = self._wiring.allocator
        for request in self._waiting():
            if request.is_warmup():
                request.fire(WARMUP_ADMITTED)  # needs no blocks, so it never holds back those behind it
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
                    self._wiring.spec.on_error,
                    error=PoolTooSmall(
                        request.room, f"needs {blocks_needed} blocks, the pool has {allocator.num_blocks}"
                    ),
                )
                continue
            blocks = allocator.alloc(request.room, wanted)
            if blocks is None:
                return
            request.fire(BLOCKS_GRANTED, blocks=blocks)

    def _waiting(self) -> Iterator[ReceiverRequest[PayloadT]]:
        """In the spec's allocation order, each state's requests in arrival order (the Machine's index)."""
        for state in self._wiring.spec.allocation_order:
            yield from self._machine.in_state(state)

    def _collect(self) -> list[ReceiverRequest[PayloadT]]:
        settled: list[ReceiverRequest[PayloadT]] = self._machine.take_settled()
        finished = [r for r in settled if self._live.get(r.room) is r]
        metrics = self._wiring.metrics
        for request in finished:
            del self._live[request.room]
            error = request.error
            cause = None if error is None else type(error).__name__
            metrics.ended(
                request.state, cause, request.failed_in, request.receive_seconds, request.landed, request.resumes
            )
            if request.state in self._wiring.spec.held_until_release:
                self._held[request.room] = request
            elif request.fenced:
                self._fenced[request.room] = request
            else:
                self._retire(request)
        lifted = [r for r in self._fenced.values() if not r.fenced]  # the fences are polled anyway
        for request in lifted:
            del self._fenced[request.room]
            self._retire(request)
        if finished or lifted:
            # The list of polled requests holds some of them: dropped now, so that it keeps none alive.
            self._members += 1
            self._polled = []
        return finished

    def _gauge(self) -> None:
        """Requests per state (held and fencing ones included) and the pool's blocks by standing."""
        counts = dict.fromkeys(self._wiring.spec.states, 0)
        fenced = 0
        for request in self:
            counts[request.state] += 1
            fenced += len(request.fenced)
        allocator = self._wiring.allocator
        free = allocator.free_count
        self._wiring.metrics.iteration(counts, free, allocator.num_blocks - free - fenced, fenced)

    def _retire(self, request: ReceiverRequest[PayloadT]) -> None:
        """Out of the Machine. Nothing else refers to the request then (the Machine bound nothing onto it,
        and no list of polled requests holds a collected one), so its payload's memory is free to go."""
        self._machine.remove_model(request)

    # ---- views -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[ReceiverRequest[PayloadT]]:
        yield from self._live.values()
        yield from self._held.values()
        yield from self._fenced.values()

    def get(self, room: Room) -> ReceiverRequest[PayloadT] | None:
        return self._live.get(room) or self._held.get(room) or self._fenced.get(room)

    @property
    def rank_count(self) -> int:
        return self._ranks.size

    @property
    def fenced_rooms(self) -> tuple[Room, ...]:
        """Failed requests whose blocks stay out of the pool until their sender is known to have stopped."""
        return tuple(self._fenced)

    @property
    def spec(self) -> ReceiverSpec:
        return self._wiring.spec
