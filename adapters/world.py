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
from typing import Any, Protocol

import torch

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

from .allocator import OwningBlockAllocator
from .buffers import TorchBlockBuffers
from .clock import ManualClock
from .concluding import LocallyConcludingLink, concluding
from .judge import Judge
from .payload import EmbeddingPayload
from .sender import InProcessSender, WarmupLink


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


class World:
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
        self._entered, self._stage, self._expect_failure = self.judge.entered, self.judge.stage, self.judge.expect_failure
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

    def go_backwards(self, room: Room) -> bool:
        """The sender answers the next poll with a status below one the receiver has already seen."""
        self._log({"backwards": room})
        self.faulted.add(room)
        seen = self.outcomes[room].states[-1] if room in self.outcomes else None
        lower = (
            {
                State.TRANSFERRING: KVPoll.Bootstrapping,
                State.WAITING_FOR_BLOCKS: KVPoll.WaitingForInput,
                State.RESUMING: KVPoll.WaitingForInput,
            }.get(seen)
            if seen is not None
            else None
        )
        if lower is None or room not in self.sender.rooms() or self.sender.status(room) is KVPoll.Failed:
            return False
        self.sender.misreport(room, lower)
        self.judge.expect_failure.add(room)
        return True

    def kill(self, room: Room) -> None:
        """The sender of ``room`` dies silently: it never writes or publishes again."""
        self._log({"kill": room})
        self.faulted.add(room)
        if room in self.sender.rooms():
            self.sender.kill(room)

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

    def fail(self, room: Room) -> None:
        self._log({"fail": room})
        self.faulted.add(room)
        if room in self.sender.rooms():
            self.sender.fail(room)

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
        self._log({"abort": room})
        self.faulted.add(room)
        aborted = self._contract(lambda: self.queue.abort(room))
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

    def corrupt_aux(self, room: Room, value: int) -> bool:
        """Overwrite T in the aux row of A0[0] after the first chunk landed and before it is read."""
        self._log({"corrupt": {"room": room, "field": "total_tokens", "value": value}})
        self.faulted.add(room)
        if not self.first_chunk_unread(room):
            return False
        self.pool.aux[self.sender.room_messages(room)[0].blocks[0], 0] = value
        self.judge.expect_failure.add(room)
        return True

    def first_chunk_unread(self, room: Room) -> bool:
        """The first chunk has landed and its status is out, and the receiver has not read it yet."""
        request = self.queue.get(room)
        return (
            request is not None
            and request.state is State.TRANSFERRING
            and room in self.sender.rooms()
            and bool(self.sender.room_messages(room))
            and self.sender.pending(room) is None
            and self.sender.status(room) in (KVPoll.Transferring, KVPoll.Success)
        )

    def corrupt_data(self, room: Room) -> bool:
        """Flip one embedding value in a chunk that landed and has not been read yet (checksummed rooms only).

        Without a checksum nothing could tell, so the bench does not do it to such a room.
        """
        self._log({"corrupt": {"room": room, "field": "embeddings"}})
        self.faulted.add(room)
        request = self.queue.get(room)
        if (
            request is None
            or room not in self.sender.rooms()
            or self.sender.source(room).checksum is None
            or request.state not in (State.TRANSFERRING, State.RESUMING)
            or self.sender.pending(room) is not None
            or not self.sender.room_messages(room)
        ):
            return False
        block = self.sender.room_messages(room)[-1].blocks[0]
        if (room, block) in self._corrupted:
            return False  # a second flip of the same value would undo the first
        self._corrupted.add((room, block))
        bits = self.pool.embeddings[block, :1].view(torch.int16)
        bits ^= 1  # the lowest mantissa bit: a different value whatever the value was
        self.judge.expect_failure.add(room)
        return True

    # ---- driving everything to an end -------------------------------------------------------------

    def drain(self, patience: int = 3, max_waits: int = 8, max_iterations: int = 2000) -> None:
        """Let the sender land everything and the caller release everything; nothing may be left over."""
        self._log({"drain": patience})
        with self.fairly():
            run_fairly(self, patience, max_waits, max_iterations)
        self.check_leaks()

    # ---- the pieces of a fair schedule (shared with the replicas of several ranks) ----------------

    @contextlib.contextmanager
    def fairly(self) -> Iterator[None]:
        """Unlogged, and judged as fair: under it a request with a live sender must not time out (I8)."""
        with self._quietly():
            self.judge.fair = True
            try:
                yield
            finally:
                self.judge.fair = False

    def unfinished(self) -> list[ReceiverRequest[EmbeddingPayload]]:
        """Requests that are live, held for the caller, or fencing blocks."""
        return list(self.queue)

    def sender_round(self) -> None:
        """The sender lands every pending chunk and acts on every abort it received."""
        for request in self.unfinished():
            if request.state is not State.SUCCESS:
                self.deliver(request.room)
            if request.state is State.FAILED:
                self.stop(request.room)

    def caller_round(self, held: Sequence[ReceiverRequest[EmbeddingPayload]]) -> None:
        for request in held:
            self.release(request.room)

    def wait_out_dead_senders(self) -> bool:
        """Move the clock past every deadline when a silent sender is what holds a request up: a dead one,
        or one that never heard of an abort and waits, idle, for a resume that will not come."""
        if not any(self._sender_silent(r) for r in self.unfinished() if r.state is not State.SUCCESS):
            return False
        self.clock.advance(max(self._deadlines.values(), default=0.0) + 1)
        return True

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

    def _sender_silent(self, request: ReceiverRequest[EmbeddingPayload]) -> bool:
        room = request.room
        if self.sender_dead(room):
            return True
        link = self._concluding.get(room)
        return (
            request.state is State.FAILED
            and link is not None
            and not link.writes_stopped()
            and self.sender.pending(room) is None
        )

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


class FairlyDriven(Protocol):
    """What a fair schedule needs of a bench: one World, or the replicas of several ranks."""

    violations: list[str]

    def unfinished(self) -> list[ReceiverRequest[EmbeddingPayload]]: ...

    def sender_round(self) -> None: ...

    def step(self, iterations: int = 1) -> list[ReceiverRequest[EmbeddingPayload]]: ...

    def caller_round(self, held: Sequence[ReceiverRequest[EmbeddingPayload]]) -> None: ...

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
