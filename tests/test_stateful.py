"""The receiver under a random sender, a random scheduler and a random client.

Each rule is something the world can do to the controller; the invariants are judged by the World from
what the sender was asked and wrote, what the allocator says, and which reads reached the pool, never
from the controller's own bookkeeping. Random pool geometry and lengths give random chunkings: a
payload may fit A0, need one resume, or be larger than the whole pool.
"""

from __future__ import annotations

from hypothesis import event, target
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from epd_receiver.adapters.world import World, WorldConfig
from epd_receiver.fsm import ReceiverRequest, State

MAX_LIVE = 5
MAX_TOTAL = 1 << 20
IMPOSSIBLE_TOTALS = st.sampled_from([0, -1, -(2**31), MAX_TOTAL + 1])


class ReceiverProtocol(RuleBasedStateMachine):
    world: World

    def __init__(self) -> None:
        super().__init__()
        self.next_room = 0

    @initialize(
        block_size=st.sampled_from([1, 2, 4, 8, 16]),
        num_blocks=st.integers(2, 24),
        default_blocks=st.integers(1, 6),
        hidden_size=st.sampled_from([2, 4, 8]),
        deepstack=st.integers(0, 2),
        data=st.data(),
    )
    def a_pool(
        self,
        block_size: int,
        num_blocks: int,
        default_blocks: int,
        hidden_size: int,
        deepstack: int,
        data: st.DataObject,
    ) -> None:
        config = WorldConfig(
            block_size=block_size,
            num_blocks=num_blocks,
            default_alloc_tokens=default_blocks * block_size - (block_size // 2),
            hidden_size=hidden_size,
            deepstack=deepstack,
            max_total_tokens=MAX_TOTAL,
        )
        self.world = World(config, seed=num_blocks, bank_rows=31)
        for _ in range(data.draw(st.integers(1, 3), label="arrivals")):
            self.a_request_arrives_now(data)

    def a_request_arrives_now(self, data: st.DataObject) -> None:
        config = self.world.config
        d, pool = config.default_alloc_tokens, config.num_blocks * config.block_size
        lengths = [st.integers(1, d), st.integers(d + 1, d + pool), st.integers(d + 1, 2 * d), st.integers(1, 3 * pool)]
        total = data.draw(st.one_of(lengths), label="T")
        self.world.arrive(self.next_room, total)
        self.next_room += 1

    # ---- views of the world, in a stable order ----------------------------------------------------

    def _requests(self, *states: State) -> list[ReceiverRequest]:  # type: ignore[type-arg]
        return sorted((r for r in self.world.queue if not states or r.state in states), key=lambda r: r.room)

    def _live(self) -> list[ReceiverRequest]:  # type: ignore[type-arg]
        return [r for r in self._requests() if r.state not in (State.SUCCESS, State.FAILED)]

    def _with_pending_chunk(self) -> list[int]:
        return [r.room for r in self._live() if self.world.sender.pending(r.room) is not None]

    def _with_history(self) -> list[int]:
        return [r.room for r in self._live() if self.world.sender.published(r.room)]

    # ---- rules ------------------------------------------------------------------------------------

    @precondition(lambda self: len(self._live()) < MAX_LIVE)
    @rule(data=st.data())
    def a_request_arrives(self, data: st.DataObject) -> None:
        self.a_request_arrives_now(data)

    @rule()
    def a_scheduler_iteration(self) -> None:
        self.world.step()

    @precondition(lambda self: bool(self._with_pending_chunk()))
    @rule(data=st.data(), partial=st.one_of(st.none(), st.integers(1, 8)))
    def the_sender_lands_a_chunk(self, data: st.DataObject, partial: int | None) -> None:
        """A whole chunk lands and its status is published, or only some blocks land (still in flight)."""
        self.world.deliver(data.draw(st.sampled_from(self._with_pending_chunk()), label="room"), blocks=partial)

    @rule(iterations=st.integers(1, 3))
    def the_world_moves_on(self, iterations: int) -> None:
        """Every pending chunk lands and the scheduler runs: the fair schedule under which all must end."""
        for _ in range(iterations):
            for room in self._with_pending_chunk():
                self.world.deliver(room)
            self.world.step()

    @precondition(lambda self: bool(self._with_history()))
    @rule(data=st.data())
    def a_status_arrives_again(self, data: st.DataObject) -> None:
        """A status message the sender sent earlier is delivered again, or late (after a newer one)."""
        room = data.draw(st.sampled_from(self._with_history()), label="room")
        status = data.draw(st.sampled_from(self.world.sender.published(room)), label="status")
        self.world.late_status(room, status)

    @precondition(lambda self: bool(self._live()))
    @rule(data=st.data(), fault=st.sampled_from(["sender fails", "client aborts", "aux corrupted"]))
    def something_goes_wrong(self, data: st.DataObject, fault: str) -> None:
        """One request meets a failing sender, an impatient client, or an aux row that cannot be true."""
        room = data.draw(st.sampled_from([r.room for r in self._live()]), label="room")
        if fault == "sender fails":
            self.world.fail(room)
        elif fault == "client aborts":
            self.world.abort(room)
        else:
            self.world.corrupt_aux(room, data.draw(IMPOSSIBLE_TOTALS, label="T"))

    @precondition(lambda self: bool(self._requests(State.SUCCESS)))
    @rule(data=st.data())
    def the_caller_releases(self, data: st.DataObject) -> None:
        self.world.release(data.draw(st.sampled_from([r.room for r in self._requests(State.SUCCESS)]), label="room"))

    # ---- invariants -------------------------------------------------------------------------------

    @invariant()
    def no_invariant_is_violated(self) -> None:
        violations = self.world.check()
        assert not violations, violations

    def teardown(self) -> None:
        if not hasattr(self, "world"):
            return
        outcomes = list(self.world.outcomes.values())
        event("requests", len(outcomes))
        resumed = sum(o.resumes > 0 for o in outcomes)
        event("resumed", resumed)
        target(resumed, label="resumed requests")
        self.world.drain()
        event("ended in SUCCESS", sum(o.states[-1] is State.SUCCESS for o in outcomes))
        violations = self.world.check()
        assert not violations, violations
        assert self.world.allocator.free_count == self.world.config.num_blocks


TestReceiverProtocol = ReceiverProtocol.TestCase
