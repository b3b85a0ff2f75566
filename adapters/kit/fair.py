"""The fair schedule: the sender lands everything, the scheduler polls, the caller releases everything.

Under it every request with a live sender must end without a timeout (I8), and nothing may be left owned
or fenced afterwards (I5). It drives one World, or the replicas of several ranks, through the same
pieces; a request held up only by a silent sender ends by its deadline, so then the clock is moved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from epd_receiver.adapters.kit.recording import Recording
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.fsm import ReceiverRequest, Room, State

if TYPE_CHECKING:
    from epd_receiver.adapters.kit.concluding import LocallyConcludingLink
    from epd_receiver.adapters.kit.judge import Judge
    from epd_receiver.adapters.ports.clock import ManualClock
    from epd_receiver.adapters.ports.sender import InProcessSender

Request = ReceiverRequest[EmbeddingPayload]


class FairlyDriven(Protocol):
    """What a fair schedule needs of a bench: one World, or the replicas of several ranks."""

    violations: list[str]

    def unfinished(self) -> list[Request]: ...

    def sender_round(self) -> None: ...

    def step(self, iterations: int = 1) -> list[Request]: ...

    def caller_round(self, held: Sequence[Request]) -> None: ...

    def wait_out_dead_senders(self) -> bool: ...

    def snapshot(self) -> tuple[object, ...]: ...


def run_fairly(bench: FairlyDriven, patience: int = 3, max_waits: int = 8, max_iterations: int = 2000) -> None:
    """Run to an end: the sender lands everything, the scheduler polls, the caller releases everything.

    Under this fair schedule every request with a live sender must end without a timeout (I8);
    ``patience`` iterations without any change mean it never will, and so do ``max_iterations`` with
    changes that lead nowhere (a livelock). Requests whose sender died can only end by their deadline,
    so then the clock is moved past it (at most ``max_waits`` times).
    """
    waits = idle = 0
    for _ in range(max_iterations):
        unfinished = bench.unfinished()
        if not unfinished:
            return
        if idle >= patience:
            if waits < max_waits and bench.wait_out_dead_senders():
                waits, idle = waits + 1, 0
                continue
            bench.violations.append(f"I8: no progress for {patience} fair iterations: {unfinished}")
            return
        before = bench.snapshot()
        held = [r for r in unfinished if r.state is State.SUCCESS]
        bench.sender_round()
        bench.step()
        bench.caller_round(held)
        idle = idle + 1 if bench.snapshot() == before else 0
    bench.violations.append(f"I8: not done after {max_iterations} fair iterations: {bench.unfinished()}")


class FairSchedule(Recording):
    """The pieces of a fair schedule, for a World (the replicas of several ranks combine their ranks')."""

    queue: Any
    sender: InProcessSender
    allocator: Any
    clock: ManualClock
    judge: Judge
    _concluding: dict[Room, LocallyConcludingLink]
    _deadlines: dict[State, float]

    def drain(self, patience: int = 3, max_waits: int = 8, max_iterations: int = 2000) -> None:
        """Let the sender land everything and the caller release everything; nothing may be left over."""
        self._log({"drain": patience})
        with self.fairly():
            run_fairly(self, patience, max_waits, max_iterations)
        self.check_leaks()

    @contextlib.contextmanager
    def fairly(self) -> Iterator[None]:
        """Unlogged, and judged as fair: under it a request with a live sender must not time out (I8)."""
        with self._quietly():
            self.judge.fair = True
            try:
                yield
            finally:
                self.judge.fair = False

    def unfinished(self) -> list[Request]:
        """Requests that are live, held for the caller, or fencing blocks."""
        return list(self.queue)

    def sender_round(self) -> None:
        """The sender lands every pending chunk and acts on every abort it received."""
        for request in self.unfinished():
            if request.state is not State.SUCCESS:
                self.deliver(request.room)
            if request.state is State.FAILED:
                self.stop(request.room)

    def caller_round(self, held: Sequence[Request]) -> None:
        for request in held:
            self.release(request.room)

    def wait_out_dead_senders(self) -> bool:
        """Move the clock past every deadline when a silent sender is what holds a request up: a dead one,
        one that never heard of an abort and waits, idle, for a resume that will not come, or one whose
        fault (a misstated total) left it waiting for a resume the receiver has no reason to send."""
        if not self.held_up_by_silence():
            return False
        self.wait_out_deadlines()
        return True

    def held_up_by_silence(self) -> bool:
        return any(self._sender_silent(r) for r in self.unfinished() if r.state is not State.SUCCESS)

    def wait_out_deadlines(self) -> None:
        self.clock.advance(max(self._deadlines.values(), default=0.0) + 1)

    def check_leaks(self) -> None:
        self.judge.leaks()

    def snapshot(self) -> tuple[object, ...]:
        return (
            tuple((r.room, r.state, r.landed, r.fenced) for r in self.queue),
            self.allocator.free_count,
            tuple(self.sender.pending(room) for room in self.sender.rooms()),
        )

    def sender_dead(self, room: Room) -> bool:
        return room in self.sender.rooms() and self.sender.is_dead(room)

    def _sender_silent(self, request: Request) -> bool:
        room = request.room
        if self.sender_dead(room):
            return True
        if request.state in (State.TRANSFERRING, State.RESUMING):
            # the receiver waits for the sender's news; a room the judge lets time out, with nothing more to land
            return room in self.judge.silenced and room in self.sender.rooms() and self.sender.pending(room) is None
        if request.state is not State.FAILED or not request.fenced:
            return False
        if self.sender.is_broken(room):
            return True  # a dead link: the fence ends by the drain deadline
        link = self._concluding.get(room)
        return link is not None and not link.writes_stopped() and self.sender.pending(room) is None
