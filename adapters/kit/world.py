"""A receiver queue wired to the in-process sender over one pool, and the judge that watches them.

This is the bench that ``simulate``, ``replay`` and the stateful tests share. The judge never looks at
the controller's reasoning: it knows what the sender was asked and wrote (its message log and sources),
what the allocator says each block belongs to, which reads reached the pool and which rows the sender
wrote, and from those alone it decides whether invariants I1-I8, I10 and I11 held.

World holds the parts and speaks the vocabulary of scenarios (arrive, step, deliver, abort, advance, ...);
the rest of what it does lives with its concern: the faults a peer injects (``faults.Faults``), the fair
schedule (``fair.FairSchedule``), the event log (``recording.Recording``), the report
(``report.Reporting``), the judge's witness on the pool (``audited_buffers``) and the canonical state
(``fingerprint``), which ``World.fingerprint`` completes with what the World itself remembers.
"""

from __future__ import annotations

from typing import Any

from epd_receiver.adapters.kit.audited_buffers import AuditedBuffers
from epd_receiver.adapters.kit.concluding import LocallyConcludingLink, concluding
from epd_receiver.adapters.kit.fair import FairSchedule
from epd_receiver.adapters.kit.faults import Faults
from epd_receiver.adapters.kit.fingerprint import parts_of
from epd_receiver.adapters.kit.judge import Judge
from epd_receiver.adapters.kit.report import Reporting
from epd_receiver.adapters.kit.world_config import WorldConfig
from epd_receiver.adapters.ports.allocator import OwningBlockAllocator
from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.clock import ManualClock
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.adapters.ports.sender import InProcessSender
from epd_receiver.adapters.ports.sender_links import WarmupLink
from epd_receiver.fsm import (
    KVPoll,
    RankGroup,
    ReceiverMetrics,
    ReceiverQueue,
    ReceiverRequest,
    ReceiverSpec,
    Room,
    State,
)
from epd_receiver.fsm.config import deadlines


class World(Faults, FairSchedule, Reporting):
    """The receiver's queue, its pool and allocator, the in-process sender and a manual clock, with the
    judge watching: the bench that ``simulate``, ``replay``, the fuzzer and the explorer share."""

    def __init__(
        self,
        config: WorldConfig,
        *,
        seed: int = 0,
        bank_rows: int = 4096,
        spec: ReceiverSpec | None = None,
        request_class: type[ReceiverRequest[EmbeddingPayload]] = ReceiverRequest,
        queue_class: type[ReceiverQueue[EmbeddingPayload]] = ReceiverQueue,
        ranks: RankGroup | None = None,
        record: bool = True,
        metrics: ReceiverMetrics | None = None,
    ) -> None:
        self.config = config
        self.pool = TorchBlockBuffers(config.num_blocks, config.block_size, config.hidden_size, config.deepstack)
        self.allocator = OwningBlockAllocator(config.num_blocks, config.block_size)
        self.sender = InProcessSender(
            self.pool,
            seed=seed,
            bank_rows=bank_rows,
            block_size=config.sender_block_size,
            async_abort=config.async_abort,
        )
        self.clock = ManualClock()
        self.receiver_config = config.receiver_config()
        self.queue: ReceiverQueue[EmbeddingPayload] = queue_class(
            AuditedBuffers(self, self.pool),
            self.allocator,
            self.receiver_config,
            spec=spec,
            request_class=request_class,
            clock=self.clock,
            ranks=ranks,
            metrics=metrics,
        )
        self._deadlines = deadlines(self.queue.spec, self.receiver_config)
        self.judge = Judge(self)
        self.outcomes = self.judge.outcomes
        self.violations = self.judge.violations  # the judge's findings, and the contract errors met here
        self.seed = seed
        self.bank_rows = bank_rows
        self._start_log(record)
        self._abort_heard: dict[Room, float] = {}  # when the sender got each abort it has not acted on
        self._concluding: dict[Room, LocallyConcludingLink] = {}  # links that conclude locally, by room
        self._corrupted: set[tuple[Room, int]] = set()  # (room, block) of every data corruption so far

    # ---- the vocabulary of scenarios (each call is logged as the replay event that repeats it) -----

    def arrive(
        self,
        room: Room,
        total_tokens: int,
        mrope_delta: int | None = None,
        progress: bool = False,
        warmup: bool = False,
        checksum: bool = False,
    ) -> ReceiverRequest[EmbeddingPayload]:
        """A request arrives; with ``progress`` its sender reports tokens landed, so it may resume in rounds;
        a ``warmup`` request is a health check whose stand-in sender writes nothing (I11); with ``checksum``
        the sender writes an xxh3-64 digest of the payload into A0[0]'s spare aux slots."""
        if warmup:
            request = self.queue.add(room, WarmupLink(), warmup=True)
        else:
            link = self.sender.add_room(room, total_tokens, mrope_delta, progress=progress, checksum=checksum)
            if self.config.local_conclusion:
                link = self._concluding.setdefault(room, concluding(link))  # type: ignore[assignment]
            request = self.queue.add(room, link)
        self.judge.arrived(request, total_tokens, warmup=warmup)
        self._log(self.log_of_arrival(room, total_tokens, progress=progress, warmup=warmup, checksum=checksum))
        return request

    def log_of_arrival(self, room: Room, total_tokens: int, **flags: Any) -> dict[str, Any]:
        """The replay event of an arrival, with the delta the sender drew so that a replay draws no other."""
        arrival: dict[str, Any] = {"room": room, "total_tokens": total_tokens}
        if not flags.get("warmup"):
            arrival["mrope_delta"] = self.sender.source(room).mrope_delta
        return {"arrive": arrival | {name: True for name, on in flags.items() if on}}

    def step(self, iterations: int = 1) -> list[ReceiverRequest[EmbeddingPayload]]:
        self._log({"step": iterations})
        finished: list[ReceiverRequest[EmbeddingPayload]] = []
        for _ in range(iterations):
            sent_before, fencing = self.judge.before_iteration()
            try:
                ended = self.queue.step()
            except Exception as error:  # a ContractError, or a controller that crashed outright
                self.violations.append(f"{type(error).__name__}: {error}")
                break
            self.judge.iteration(ended, sent_before, fencing)
            finished.extend(ended)
        return finished

    def deliver(self, room: Room, blocks: int | None = None) -> bool:
        """The sender lands its pending chunk for ``room`` (only ``blocks`` of it, still in flight, if given)."""
        self._log({"deliver": room} if blocks is None else {"deliver": {"room": room, "blocks": blocks}})
        written = len(self.sender.writes)
        landed = room in self.sender.rooms() and self.sender.deliver(room, blocks)
        self.judge.wrote(self.sender.writes[written:])
        return landed

    def stop(self, room: Room) -> bool:
        """The sender acts on the abort it received for ``room``: it drops its pending chunk and says so."""
        self._log({"stop": room})
        return room in self.sender.rooms() and self.sender.act_on_abort(room)

    def late_status(self, room: Room, status: KVPoll | None = None) -> bool:
        """A status message the sender already sent arrives again, or late (the latest one by default).

        Only a message that was really sent can arrive twice; the status table keeps the highest.
        """
        self._log({"late": room} if status is None else {"late": {"room": room, "status": int(status)}})
        sent = self.sender.published(room) if room in self.sender.rooms() else []
        if status is None and sent:
            status = sent[-1]
        if status is None or status not in sent:
            return False
        self.sender.publish(room, status)
        return True

    def abort(self, room: Room) -> bool:
        """The client gives up on ``room``: a request that already ended must not notice (I7)."""
        self._log({"abort": room})
        self.faulted.add(room)
        before = self.queue.get(room)
        ended = before is None or before.state in self.queue.spec.terminal
        aborted = self._contract(lambda: self.queue.abort(room))
        if ended and aborted:
            self.violations.append(f"I7: room {room} was aborted after it had ended")
        self.judge.observe()
        request = self.queue.get(room)
        if request is not None and request.state is State.FAILED:
            self.judge.ended(request)
        return bool(aborted)

    def release(self, room: Room) -> bool:
        self._log({"release": room})
        request = self.queue.get(room)
        if request is None or request.state is not State.SUCCESS or self.outcomes[room].released:
            return False
        self._contract(lambda: self.queue.release(room))
        self.outcomes[room].released = True
        if room in self.sender.rooms():
            self.sender.forget(room)
        return True

    # ---- time, and the sender's drain contract ---------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Time passes on the receiver's clock (deadlines are judged at the next iteration).

        A sender that learns of aborts late still acts on each within the drain deadline, and a write in
        flight when the receiver gave up (a sender that never hears of the abort) lands within it: that is
        the contract that lets the receiver reuse fenced blocks once the deadline has passed.
        """
        self._log({"advance": seconds})
        for room in self.sender.rooms():
            if self.sender.abort_queued(room) or self._unheard_abort(room):
                self._abort_heard.setdefault(room, self.clock.now())
        self.clock.advance(seconds)
        drain = self.receiver_config.drain_timeout_s
        for room, heard in list(self._abort_heard.items()):
            if drain is not None and self.clock.now() - heard >= drain:
                if self._unheard_abort(room):
                    with self._quietly():  # part of this advance: a replay repeats it by itself
                        self.deliver(room)
                self.sender.act_on_abort(room)
                del self._abort_heard[room]

    def _unheard_abort(self, room: Room) -> bool:
        """This side gave up on ``room`` without the sender hearing of it, and a write is still in flight."""
        link = self._concluding.get(room)
        return link is not None and link.aborted and self.sender.pending(room) is not None

    def drain_ahead(self) -> list[float]:
        """Seconds left until the sender must have acted on each abort it heard, or will hear at the next
        ``advance``: the drain contract's deadlines, which ``advance`` enforces."""
        drain, now = self.receiver_config.drain_timeout_s, self.clock.now()
        if drain is None:
            return []
        owed = [room for room in self.sender.rooms() if self.sender.abort_queued(room) or self._unheard_abort(room)]
        return [drain - (now - self._abort_heard.get(room, now)) for room in owed]

    # ---- the judge's hooks and verdicts -----------------------------------------------------------

    @property
    def faulted(self) -> set[Room]:
        """Rooms a fault touched, on any rank: their requests need not succeed (I12)."""
        return self.judge.faulted

    @property
    def deadlines(self) -> dict[State, float]:
        return self._deadlines

    def overstayed(self, room: Room, limit: float) -> bool:
        return self.judge.overstayed(room, limit)

    def checkpoint(self) -> None:
        """Judge the state now and keep what is wrong: a replay is judged after every event, like the fuzzer."""
        self.judge.checkpoint()

    def check(self) -> list[str]:
        """All invariant violations seen so far, including the ones only visible in the current state."""
        return self.judge.check()

    def _contract(self, action: Any) -> Any:
        try:
            return action()
        except Exception as error:  # a ContractError, or a controller that crashed outright
            self.violations.append(f"{type(error).__name__}: {error}")
            return None

    # ---- the canonical state ----------------------------------------------------------------------

    def fingerprint(self) -> tuple[object, ...]:
        """Everything that can influence what happens next or what the judge will say, with every time
        taken relative to the clock: equal fingerprints, equal futures (``fingerprint.py`` says what is
        left out, and why)."""
        now = self.clock.now()
        return (*parts_of(self, now), self._memory(now))

    def _memory(self, now: float) -> tuple[object, ...]:
        """What the World itself remembers between events: which aborts the sender heard and when (the
        drain contract), which chunks were flipped, and what each locally concluding link concluded (it
        outlives its request: a late write still lands)."""
        return (
            tuple(sorted((room, now - t) for room, t in self._abort_heard.items())),
            tuple(sorted(self._corrupted)),
            tuple((room, link.aborted, link.concluded) for room, link in self._concluding.items()),
        )
