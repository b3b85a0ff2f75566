"""One request's controller: the model the shared Machine drives. Its public methods are the spec's actions.

Nothing here decides *when* something happens; that is the spec's table. Each action does one thing
the spec names, and raises a typed ReceiverError when the world hands it something that cannot be true.
This module drives a request (its polls, deadlines, guards and read windows) and holds its blocks and its
link; the actions that read the pool and assemble the payload are ``assembly.PayloadAssembly``'s.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

from .assembly import PayloadAssembly
from .config import Wiring
from .errors import ReceiverError, Room
from .kvpoll import LINK_ERROR, STATUSES, UNKNOWN_STATUS, KVPoll
from .ports import PayloadT, TransportLink
from .states import State
from .window import ReadWindow


class ReceiverRequest(PayloadAssembly[PayloadT]):
    # Slots, what every poll reads first: thousands of requests in flight are polled each iteration, and a
    # request's fields side by side (not in a dictionary of their own) keep that walk in few cache lines
    # and a request small. The assembly's fields are here too; a ``__dict__`` (PayloadAssembly's) stays for a
    # subclass's or a test's own attributes, created only when one is set.
    __slots__ = (  # noqa: RUF023  # the order is the layout: what every poll reads comes first
        "state",  # set by the Machine
        "link_error",
        "link",
        "_landed_tokens",
        "reported_landed",
        "senders_done",
        "_wiring",
        "deadline_at",
        "total_tokens",
        "landed",
        "blocks",
        "fenced",
        "room",
        "warmup",
        "_window",
        "unknown_status",
        "first_block",
        "checksum",
        "checksum_algorithm",
        "_mrope_delta",
        "_digest",
        "payload",
        "reads",
        "resumes",
        "error",
        "arrived_at",
        "entered_at",
        "stage_seconds",
        "failed_in",
        "_fenced_at",
    )
    state: State

    def __init__(self, room: Room, link: TransportLink, wiring: Wiring[PayloadT], *, warmup: bool = False) -> None:
        self.room = room
        self.link = link
        self.warmup = warmup
        self._wiring = wiring
        self._window: ReadWindow[PayloadT] = ReadWindow(wiring.buffers, room)
        self.blocks: tuple[int, ...] = ()
        self.fenced: tuple[int, ...] = ()
        self.reported_landed = 0  # the sender's landed count as of the last poll (reduced over ranks)
        # Every rank's link has evidence that its sender writes no more, reduced over ranks with the last
        # poll; None with a single rank, whose own link is then asked when a guard needs the answer.
        self.senders_done: bool | None = None
        self.link_error: str | None = None  # what this rank's link raised, failed with at the next poll
        self.unknown_status: int | None = None  # the last value outside KVPoll this rank's link returned
        self.first_block: int | None = None
        self._start_assembly()
        self.resumes = 0
        self.error: ReceiverError | None = None
        self.arrived_at = self.entered_at = wiring.clock.now()
        self.deadline_at = self._deadline_from(self.entered_at, wiring.spec.initial)
        # Seconds spent in each state it has left, by state name, summed over visits (a resume round may
        # visit WAITING_FOR_BLOCKS and RESUMING several times); on the queue's clock.
        self.stage_seconds: dict[str, float] = {}
        self.failed_in: State | None = None  # the state it failed from, for timeouts by state
        self._fenced_at = 0.0  # when the fence it holds was set, to report how long it lasted
        self._landed_tokens: Callable[[], int] | None = getattr(link, "landed_tokens", None)

    def __repr__(self) -> str:
        return f"<ReceiverRequest room={self.room} {self.state.name} blocks={len(self.blocks)} landed={self.landed}>"

    # ---- driving ---------------------------------------------------------------------------------

    def local_landed(self) -> int:
        """This rank's view of the sender's landed count (0 without progress), read once per iteration."""
        return 0 if self._landed_tokens is None else self._landed_tokens()

    def local_poll(self) -> int:
        """This rank's poll: LINK_ERROR once its link has raised, here or in init or resume; UNKNOWN_STATUS
        for a value outside KVPoll (kept, to be named in the error)."""
        if self.link_error is not None:
            return LINK_ERROR
        try:
            value = self.link.poll()
        except Exception as error:
            self.link_error = f"poll raised {error!r}"
            return LINK_ERROR
        if value in STATUSES:
            return value
        self.unknown_status = value
        return UNKNOWN_STATUS

    def local_writes_stopped(self) -> bool:
        """This rank's link has evidence that the sender writes no more; a link that cannot say has none."""
        try:
            return bool(self.link.writes_stopped())
        except Exception:
            return False

    def on_local_poll(self, value: int) -> None:
        """A rank alone: its own observations are the reduced ones (the done flag is asked for when needed)."""
        self.on_poll(value, self.local_landed(), None)

    def on_poll(self, value: int, landed: int, senders_done: bool | None) -> None:
        """Apply one reduced poll, landed count and done flag; the spec's no-op cells return before any trigger."""
        self.reported_landed = landed
        self.senders_done = senders_done
        table = self._wiring.polls.get(self.state)
        if table is None:
            return
        cell = table.get(value)
        if cell is None:
            cell = table[UNKNOWN_STATUS]
        enabled = cell.enabled
        if cell.event is None or (enabled is not None and not enabled(self)):
            return
        if cell.cause is not None:
            error_type = self._wiring.spec.causes[cell.cause]
            detail = f"poll {self._poll_name(value)} in {self.state.name}"
            reason = self._link_error_reason() if value == LINK_ERROR else self._failure_reason()
            self.fire(cell.event, error=error_type(self.room, f"{detail}: {reason}" if reason else detail))
        else:
            self.fire(cell.event)

    def fire(self, event: str, **kwargs: Any) -> None:
        """Trigger an event; a typed error raised by an action fails this request and nothing else."""
        try:
            self.trigger(event, **kwargs)
        except ReceiverError as error:
            self.trigger(self._wiring.spec.on_error, error=error)

    def trigger(self, event: str, **kwargs: Any) -> bool:
        """The Machine's trigger by name, defined once on the class: the Machine binds nothing onto a request,
        so an admission costs no function per event and a retired request holds no cycle through them."""
        machine = self._wiring.machine
        if machine is None:
            raise RuntimeError(f"room {self.room}: no Machine drives this request")
        return machine.trigger_event(self, event, **kwargs)

    def _deadline_from(self, now: float, state: State) -> float:
        """Kept absolute, so that the poll loop only compares it with the time."""
        limit = self._wiring.deadlines.get(state)
        return math.inf if limit is None else now + limit

    def deadline_passed(self, *, everywhere: bool) -> None:
        """The current state's deadline passed on some rank's clock (``everywhere``: on every rank's).

        Fire what the spec's [timeouts] names for it. A deadline that fails the request is taken as soon as
        any rank's clock says so: failing early is safe. One that lifts a fence waits until every rank's
        clock says so: reusing blocks early is not.
        """
        timeout = self._wiring.spec.timeouts.get(self.state)
        if timeout is None or (timeout.cause is None and not everywhere):
            return
        if timeout.cause is None:
            self.fire(timeout.event)
            return
        limit = self._wiring.deadlines[self.state]
        error_type = self._wiring.spec.causes[timeout.cause]
        self.fire(timeout.event, error=error_type(self.room, f"{self.state.name} for more than {limit:g} s"))

    def stamp_entry(self, event: Any) -> None:
        """After every state change (internal ones included): deadlines count from here, and the stage left
        is timed. With the fence's actions, the only places the metrics hear of a transition, so that the
        poll loop, which changes nothing most iterations, never reaches them."""
        state, left = self.state, type(self.state)[event.transition.source]
        now = self._wiring.clock.now()
        self.deadline_at = self._deadline_from(now, state)
        if state is not left:
            spent = now - self.entered_at
            self.stage_seconds[left.name] = self.stage_seconds.get(left.name, 0.0) + spent
            self.entered_at = now
            if self.error is not None and self.failed_in is None:
                self.failed_in = left
            self._wiring.metrics.entered(state, left, spent)

    @property
    def receive_seconds(self) -> float:
        """From arrival to the state it is in now (its end, once terminal)."""
        return self.entered_at - self.arrived_at

    @property
    def takes_partial_grants(self) -> bool:
        """A remainder may come in several rounds only when the sender reports progress."""
        return self._landed_tokens is not None and self.total_tokens is not None

    # ---- guards ----------------------------------------------------------------------------------

    def is_warmup(self, event: Any = None) -> bool:
        return self.warmup

    def sender_may_write(self, event: Any = None) -> bool:
        """An init or resume went out for the blocks held, and not every rank's link has evidence that its
        sender is done (a conclusion of our own, such as SGLang's Failed after a local abort, is none)."""
        return bool(self.blocks) and not self.senders_stopped()

    def holds_fence(self, event: Any = None) -> bool:
        return bool(self.fenced)

    def senders_stopped(self, event: Any = None) -> bool:
        """Every rank's link has evidence that its sender writes no more: as of the last reduce with several
        ranks (every rank must decide alike), or asked now with one."""
        return self.local_writes_stopped() if self.senders_done is None else self.senders_done

    def sender_progressed(self, event: Any = None) -> bool:
        """A whole round landed and the payload is not complete yet (the last round ends with Success)."""
        if self._landed_tokens is None or self.total_tokens is None:
            return False
        return self.landed + self.capacity <= self.reported_landed < self.total_tokens

    @property
    def tokens_wanted(self) -> int:
        """What the next allocation must cover: the default before T is known, the remainder after."""
        if self.total_tokens is None:
            return self._wiring.config.default_alloc_tokens
        return self.total_tokens - self.landed

    # ---- read windows (inserted by the Machine from the spec's `reads`) ----------------------------

    def open_aux_window(self, event: Any) -> None:
        self._window.grant_aux(self.first_block)

    def open_data_window(self, event: Any) -> None:
        self._window.grant_data(self.blocks)

    def close_read_window(self, event: Any) -> None:
        self._window.close()

    # ---- actions ---------------------------------------------------------------------------------

    def take_blocks(self, event: Any) -> None:
        self.blocks = tuple(event.kwargs["blocks"])

    def send_init(self, event: Any) -> None:
        self.first_block = self.blocks[0] if self.blocks else None
        with self._transport("init"):
            self.link.init(self.blocks, self.capacity)

    def free_blocks(self, event: Any) -> None:
        if self.blocks:
            blocks, self.blocks = self.blocks, ()
            self._wiring.allocator.free(self.room, blocks)

    def fence_blocks(self, event: Any) -> None:
        """Keep blocks the sender may still write out of the free list until it is known to have stopped."""
        blocks, self.blocks = self.blocks, ()
        self._wiring.allocator.fence(self.room, blocks)
        self.fenced = blocks
        self._fenced_at = self._wiring.clock.now()
        self._wiring.metrics.fenced(len(blocks))

    def lift_fence(self, event: Any) -> None:
        fenced, self.fenced = self.fenced, ()
        self._wiring.allocator.unfence(self.room, fenced)
        self._wiring.metrics.fence_lifted(len(fenced), self._wiring.clock.now() - self._fenced_at)

    def send_resume(self, event: Any) -> None:
        with self._transport("resume"):
            self.link.resume(self.blocks, self.landed, self.capacity)
        self.resumes += 1

    def notify_sender(self, event: Any) -> None:
        # Best effort: the request is failing already, and a dead link is often why.
        with contextlib.suppress(Exception):
            self.link.abort()

    def record_error(self, event: Any) -> None:
        self.error = event.kwargs["error"]

    # ---- helpers ---------------------------------------------------------------------------------

    def _failure_reason(self) -> str | None:
        """The sender's own account of a failure, when the link offers one (best effort)."""
        explain = getattr(self.link, "failure_reason", None)
        if explain is None:
            return None
        try:
            reason = explain()
        except Exception:
            return None
        return None if reason is None else str(reason)

    def _poll_name(self, value: int) -> str:
        if value == LINK_ERROR:
            return "link_error"
        if value == UNKNOWN_STATUS:
            seen = self.unknown_status
            return "a value outside KVPoll on another rank" if seen is None else f"{seen} (not a KVPoll value)"
        return _poll_name(value)

    def _link_error_reason(self) -> str:
        return self.link_error or "the link raised on another rank"

    @contextlib.contextmanager
    def _transport(self, what: str) -> Iterator[None]:
        """A link that raises is remembered, not raised: the next poll reports LINK_ERROR, which the ranks
        reduce, so that every rank fails the request in the same iteration (with one rank failing alone
        here, the ranks' queues would part). The blocks stay recorded: the request fences them then."""
        try:
            yield
        except ReceiverError:
            raise
        except Exception as error:
            self.link_error = f"{what} raised {error!r}"


def _poll_name(value: int) -> str:
    try:
        return KVPoll(value).name
    except ValueError:
        return f"{value} (not a KVPoll value)"
