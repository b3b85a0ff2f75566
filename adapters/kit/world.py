"""A receiver queue wired to the in-process sender over one pool, and the judge that watches them.

This is the bench that ``simulate``, ``replay`` and the stateful tests share. The judge never looks at
the controller's reasoning: it knows what the sender was asked and wrote (its message log and sources),
what the allocator says each block belongs to, which reads reached the pool and which rows the sender
wrote, and from those alone it decides whether invariants I1-I8, I10 and I11 held.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from epd_receiver.adapters.kit.concluding import LocallyConcludingLink, concluding
from epd_receiver.adapters.kit.fair import FairSchedule
from epd_receiver.adapters.kit.faults import Faults
from epd_receiver.adapters.kit.judge import Judge
from epd_receiver.adapters.ports.allocator import OwningBlockAllocator
from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.clock import ManualClock
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.adapters.ports.sender import InProcessSender, WarmupLink
from epd_receiver.fsm import (
    AuxRow,
    KVPoll,
    RankGroup,
    ReceiverConfig,
    ReceiverQueue,
    ReceiverRequest,
    ReceiverSpec,
    Room,
    State,
)
from epd_receiver.fsm.request import deadlines


@dataclass(frozen=True, slots=True)
class WorldConfig:
    block_size: int
    num_blocks: int
    default_alloc_tokens: int
    hidden_size: int
    deepstack: int = 0
    max_total_tokens: int = 1 << 24
    timeouts: dict[str, float | None] = field(default_factory=dict)  # ReceiverConfig *_timeout_s overrides
    sender_block_size: int | None = None  # the Encode side's B, when it is misconfigured to differ
    async_abort: bool = False  # the sender may still land a chunk after an abort, until it acts on it
    # Links conclude locally, as SGLang's receiver: an abort turns poll() to Failed and never reaches the
    # sender, which lands what it had in flight; terminal statuses latch.
    local_conclusion: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorldConfig:
        return cls(
            block_size=int(data["block_size"]),
            num_blocks=int(data["num_blocks"]),
            default_alloc_tokens=int(data["default_alloc_tokens"]),
            hidden_size=int(data["hidden_size"]),
            deepstack=int(data.get("deepstack", 0)),
            max_total_tokens=int(data.get("max_total_tokens", 1 << 24)),
            timeouts={k: None if v is None else float(v) for k, v in dict(data.get("timeouts", {})).items()},
            sender_block_size=None if data.get("sender_block_size") is None else int(data["sender_block_size"]),
            async_abort=bool(data.get("async_abort", False)),
            local_conclusion=bool(data.get("local_conclusion", False)),
        )

    def receiver_config(self) -> ReceiverConfig:
        return ReceiverConfig(self.default_alloc_tokens, self.max_total_tokens, **self.timeouts)  # type: ignore[arg-type]


class AuditedBuffers:
    """The BlockBuffers port with a witness: every read is checked against the sender and the allocator."""

    def __init__(self, world: World, inner: TorchBlockBuffers) -> None:
        self._world = world
        self.inner = inner

    @property
    def block_size(self) -> int:
        return self.inner.block_size

    def read_aux(self, block: int) -> AuxRow:
        self._world.judge.aux_read(block)
        return self.inner.read_aux(block)

    def new_payload(self, total_tokens: int, mrope_delta: int) -> EmbeddingPayload:
        return self.inner.new_payload(total_tokens, mrope_delta)

    def checksum(self, payload: EmbeddingPayload) -> int:
        return self.inner.checksum(payload)

    def gather(self, blocks: Sequence[int], tokens: int, into: EmbeddingPayload, at: int) -> None:
        self._world.judge.gathered(tuple(blocks))
        self.inner.gather(blocks, tokens, into, at)


class World(Faults, FairSchedule):
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
        )
        self._deadlines = deadlines(self.queue.spec, self.receiver_config)
        self.judge = Judge(self)
        self.outcomes = self.judge.outcomes
        self.violations = self.judge.violations  # the judge's findings, and the contract errors met here
        self.seed = seed
        self.bank_rows = bank_rows
        self.log: list[dict[str, Any]] = []
        self._recording = record
        self._abort_heard: dict[Room, float] = {}  # when the sender got each abort it has not acted on
        self._concluding: dict[Room, LocallyConcludingLink] = {}  # links that conclude locally, by room
        self.version = 0  # events so far, logged or not
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
        the sender writes a CRC32 of the payload into A0[0]'s spare aux slots."""
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

    @property
    def faulted(self) -> set[Room]:
        """Rooms a fault touched, on any rank: their requests need not succeed (I12)."""
        return self.judge.faulted

    @property
    def deadlines(self) -> dict[State, float]:
        return self._deadlines

    def overstayed(self, room: Room, limit: float) -> bool:
        return self.judge.overstayed(room, limit)

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

    # ---- the event log ---------------------------------------------------------------------------

    def _log(self, event: dict[str, Any]) -> None:
        self.version += 1  # every event passes here: what was judged before it may no longer hold
        if self._recording:
            self.log.append(event)

    @contextlib.contextmanager
    def _quietly(self) -> Iterator[None]:
        recording, self._recording = self._recording, False
        try:
            yield
        finally:
            self._recording = recording

    def scenario(self, **extra: Any) -> dict[str, Any]:
        """Everything this world went through, as a scenario that ``replay`` repeats exactly."""
        return {
            **extra,
            "config": dataclasses.asdict(self.config),
            "seed": self.seed,
            "bank_rows": self.bank_rows,
            "events": list(self.log),
        }

    # ---- the judge's verdicts ----------------------------------------------------------------------

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

    def request_view(self, room: Room) -> dict[str, Any]:
        """The controller's view of one request, live or retired: state, blocks held, cached T, landed."""
        request = self.queue.get(room)
        outcome = self.outcomes[room]
        if request is None:
            return {"state": outcome.states[-1].name, "blocks": [], "total": outcome.total, "landed": outcome.landed}
        return {
            "state": request.state.name,
            "blocks": list(request.blocks),
            "total": request.total_tokens,
            "landed": request.landed,
        }

    # ---- reporting -------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        requests: dict[str, Any] = {}
        for room, outcome in self.outcomes.items():
            request = self.queue.get(room)
            if request is not None and outcome.verified is None:
                outcome.reads, outcome.resumes = request.reads, request.resumes
            requests[str(room)] = {
                "state": outcome.states[-1].name,
                "reads": outcome.reads,
                "resumes": outcome.resumes,
                "verified": bool(outcome.verified),
                "error": outcome.error,
            }
        return {
            "requests": requests,
            "pool": {
                "free": self.allocator.free_count,
                "owned": self.allocator.owned_count,
                "fenced": self.allocator.fenced_count,
                "double_frees": self.allocator.rejected_frees,
            },
            "violations": self.check(),
        }
