"""Behaviour of the core that the protocol tests pass through without pinning down.

Each test here states one observable behaviour of ``fsm/`` that a plausible slip in the code would change
(a boundary off by one, an argument dropped, a strict check made lenient) and that the controller, spec and
machine tests above it do not distinguish. spec/VERIFICATION.md §9 lists what mutation testing of ``fsm/`` finds.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from controller_bench import B, Bench, two_ranks_transferring
from fakes import BrokenLink, FakeAllocator, FakeBuffers, FakeClock, FakeLink, FakePayload, PeerRank, ProgressLink
from test_spec import dump_toml

from epd_receiver.fsm import (
    LINK_ERROR,
    UNKNOWN_STATUS,
    AuxRow,
    ConfigError,
    KVPoll,
    RankDivergence,
    ReadOutsideWindow,
    ReceiverConfig,
    ReceiverQueue,
    SingleRank,
    SpecError,
    State,
    TimedOut,
    load_spec,
)
from epd_receiver.fsm.diagram import generated_sections, mermaid, sync_generated, timeouts_markdown
from epd_receiver.fsm.lockstep import LockstepAllocator
from epd_receiver.fsm.spec import ReceiverSpec, default_spec_text

# ---- the generated documents --------------------------------------------------------------------------


def test_the_diagram_is_mermaid_even_where_graphviz_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """transitions prefers (py)graphviz when it can import it; the committed diagram is Mermaid regardless."""
    import transitions.extensions.diagrams_graphviz as graphviz_backend
    import transitions.extensions.diagrams_pygraphviz as pygraphviz_backend

    plain = mermaid(load_spec())

    class Unusable:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"a graphviz backend was used ({name})")

    monkeypatch.setattr(pygraphviz_backend, "pgv", Unusable())
    monkeypatch.setattr(graphviz_backend, "pgv", Unusable())
    assert mermaid(load_spec()) == plain


def test_a_deadline_on_a_field_the_config_lacks_is_documented_without_a_default() -> None:
    """The document can be drawn for a spec that deadlines() would refuse: the default shows as none."""
    spec = load_spec(overlay={"timeouts": {"RESUMING": "no_such_field_s"}})
    (row,) = [line for line in timeouts_markdown(spec).splitlines() if line.startswith("| RESUMING ")]
    assert row == "| RESUMING | `no_such_field_s` | none | fail: timeout |"


def _block(name: str, text: str) -> str:
    return f"<!-- generated:{name} -->\n{text}\n<!-- /generated:{name} -->"


def _sections() -> dict[str, str]:
    """Every generated section as a stale block, by name."""
    return {name: _block(name, "stale") for name in generated_sections(load_spec())}


def test_sync_refreshes_a_block_at_the_very_start_of_the_document() -> None:
    blocks = _sections()
    document = "\n\n".join(blocks.values())
    assert document.startswith("<!-- generated:")
    synced = sync_generated(document, load_spec())
    assert "stale" not in synced
    assert sync_generated(synced, load_spec()) == synced


def test_sync_keeps_the_text_outside_the_blocks_even_when_a_block_repeats() -> None:
    blocks = _sections()
    first = blocks["states"]
    document = "\n\n".join(blocks.values()) + "\n\nProse between.\n\n" + first + "\n\nProse after.\n"
    synced = sync_generated(document, load_spec())
    assert "Prose between." in synced and "Prose after." in synced
    assert synced.index("| state | meaning |") < synced.index("Prose between.")


@pytest.mark.parametrize("broken", ["missing", "closed before opened"])
def test_sync_refuses_a_document_whose_block_is_missing_or_inside_out(broken: str) -> None:
    blocks = _sections()
    if broken == "missing":
        del blocks["polls"]
    else:
        blocks["polls"] = "<!-- /generated:polls -->\nstale\n<!-- generated:polls -->"
    expected = "the document has no <!-- generated:polls --> ... <!-- /generated:polls --> block"
    with pytest.raises(ValueError, match=re.escape(expected)):
        sync_generated("\n\n".join(blocks.values()), load_spec())


# ---- overlays -----------------------------------------------------------------------------------------


def test_an_overlay_replaces_only_the_transition_with_the_same_conditions() -> None:
    """payload_landed from TRANSFERRING has a warm-up transition (conditions) and a normal one (none)."""
    overlay = {
        "transitions": [
            {
                "trigger": "payload_landed",
                "source": "TRANSFERRING",
                "dest": "SUCCESS",
                "unless": ["is_warmup"],
                "reads": ["aux", "data"],
                "actions": ["learn_total", "check_total", "expect_no_remainder", "gather_landed"],
            }
        ]
    }
    spec = load_spec(overlay=overlay)
    landed = [t for t in spec.transitions if t.trigger == "payload_landed" and t.sources == (State.TRANSFERRING,)]
    assert [t.conditions for t in landed] == [("is_warmup",), ()]
    assert landed[1].actions == ("learn_total", "check_total", "expect_no_remainder", "gather_landed")


def test_an_overlay_can_supply_the_transitions_a_base_spec_lacks() -> None:
    raw = tomllib.loads(default_spec_text())
    transitions = raw.pop("transitions")
    spec = load_spec(dump_toml(raw), overlay={"transitions": transitions})
    assert spec.transitions == load_spec().transitions


def test_a_loaded_spec_does_not_alias_its_overlay() -> None:
    """Variants keep their overlays as module constants: loading one must not tie the spec to them."""
    overlay: dict[str, Any] = {"notes": {"reviewers": {"names": ["a"]}}}
    spec = load_spec(overlay=overlay)
    overlay["notes"]["reviewers"]["names"].append("b")
    assert spec.raw["notes"] == {"reviewers": {"names": ["a"]}}


# ---- ranks --------------------------------------------------------------------------------------------


def test_a_single_rank_reduces_to_its_own_values_and_always_agrees() -> None:
    rank = SingleRank()
    assert rank.size == 1
    assert rank.min_reduce([1, 2], [4, 0, 3, 9]) == [4, 0, 3, 9]
    assert rank.same([1]) and rank.same([])


class Permissive:
    """An allocator that accepts any operation: the fingerprint is a function of the operations alone."""

    block_size = B
    num_blocks = 8
    free_count = 8

    def __init__(self, grant: tuple[int, ...] | None = (0,)) -> None:
        self.grant = grant

    def alloc(self, owner: int, tokens: int) -> tuple[int, ...] | None:
        return self.grant

    def free(self, owner: int, blocks: Sequence[int]) -> None: ...

    def fence(self, owner: int, blocks: Sequence[int]) -> None: ...

    def unfence(self, owner: int, blocks: Sequence[int]) -> None: ...


@pytest.mark.parametrize("operation", ["alloc", "free", "fence", "unfence"])
def test_the_lockstep_fingerprint_tells_owners_and_operations_apart(operation: str) -> None:
    """Two ranks that did the same to the same blocks for different rooms, or something else, have drifted."""

    def digest(name: str, owner: int) -> int:
        lockstep = LockstepAllocator(Permissive())
        if name == "alloc":
            lockstep.alloc(owner, B)
        else:
            getattr(lockstep, name)(owner, (0,))
        return lockstep.digest

    assert digest(operation, 1) != digest(operation, 2)
    others = {digest(other, 1) for other in ("alloc", "free", "fence", "unfence") if other != operation}
    assert digest(operation, 1) not in others


@pytest.mark.parametrize("other", [(1,), (0, 1), None], ids=["other-block", "more-blocks", "refused"])
def test_the_lockstep_fingerprint_tells_what_an_allocation_granted(other: tuple[int, ...] | None) -> None:
    """Ranks whose allocators answered the same request differently have drifted."""

    def digest(grant: tuple[int, ...] | None) -> int:
        lockstep = LockstepAllocator(Permissive(grant))
        assert lockstep.alloc(1, B) == grant
        return lockstep.digest

    assert digest((0,)) != digest(other)


def test_the_lockstep_fingerprint_remembers_the_whole_history() -> None:
    """Ranks that differed many operations ago and did the same since still show different fingerprints."""

    def digest(first_owner: int) -> int:
        lockstep = LockstepAllocator(Permissive())
        lockstep.alloc(first_owner, B)
        for _ in range(3):
            lockstep.free(1, (0,))
        return lockstep.digest

    assert digest(1) != digest(2)


def test_a_link_error_on_another_rank_says_so() -> None:
    peer, bench, request = two_ranks_transferring()
    peer.peer_polls[1] = LINK_ERROR  # this rank's link is fine
    peer.peer_writing.add(1)
    bench.step()
    assert request.error is not None
    assert request.error.detail == "poll link_error in TRANSFERRING: the link raised on another rank"


class ShortReduce:
    """A broken RankGroup of two whose reduce loses the last value it was given."""

    size = 2

    def min_reduce(self, rooms: Sequence[int], values: Sequence[int]) -> list[int]:
        return list(values)[:-1]

    def same(self, values: Sequence[int]) -> bool:
        return True


def test_a_reduce_that_lost_values_is_not_taken_as_an_answer() -> None:
    buffers = FakeBuffers(B)
    config = ReceiverConfig(default_alloc_tokens=B)
    queue: ReceiverQueue[Any] = ReceiverQueue(buffers, FakeAllocator(8, B), config, ranks=ShortReduce())
    queue.add(1, FakeLink(KVPoll.WaitingForInput))
    queue.add(2, FakeLink(KVPoll.WaitingForInput))
    with pytest.raises(ValueError):
        queue.step()


# ---- configuration ------------------------------------------------------------------------------------

POSITIVE_COUNTS = ("default_alloc_tokens", "max_total_tokens", "lockstep_every")
TIMEOUTS = ("bootstrap", "admission", "transfer", "blocks", "resume", "drain")


@pytest.mark.parametrize("name", POSITIVE_COUNTS)
def test_a_count_of_zero_is_refused_by_name(name: str) -> None:
    with pytest.raises(
        ValueError, match=r"^default_alloc_tokens, max_total_tokens and lockstep_every must be positive$"
    ):
        ReceiverConfig(**{name: 0})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", TIMEOUTS)
def test_a_deadline_of_zero_is_refused_by_name(name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}_timeout_s must be positive or None$"):
        ReceiverConfig(**{f"{name}_timeout_s": 0.0})  # type: ignore[arg-type]


def test_the_smallest_counts_and_deadlines_are_accepted() -> None:
    tiny = {f"{name}_timeout_s": 1e-9 for name in TIMEOUTS}
    config = ReceiverConfig(default_alloc_tokens=1, max_total_tokens=1, lockstep_every=1, **tiny)  # type: ignore[arg-type]
    assert (config.default_alloc_tokens, config.max_total_tokens, config.lockstep_every) == (1, 1, 1)
    assert ReceiverConfig(**dict.fromkeys(tiny)).drain_timeout_s is None  # type: ignore[arg-type]


# ---- what a failure says ------------------------------------------------------------------------------


class SilentReasonLink(FakeLink):
    """A link that offers a failure reason but has none to give (or fails to give it)."""

    def __init__(self, status: int, raises: bool) -> None:
        super().__init__(status)
        self.raises = raises

    def failure_reason(self) -> str | None:
        if self.raises:
            raise RuntimeError("no reason available")
        return None


@pytest.mark.parametrize("raises", [False, True], ids=["none", "raises"])
def test_a_sender_failure_without_a_reason_says_only_what_was_polled(raises: bool) -> None:
    bench = Bench.make()
    link = bench.links[1] = SilentReasonLink(KVPoll.WaitingForInput, raises)
    request = bench.queue.add(1, link)
    bench.step()
    link.status = int(KVPoll.Failed)
    bench.step()
    assert request.error is not None and request.error.detail == "poll Failed in TRANSFERRING"


def test_a_client_abort_says_so() -> None:
    bench = Bench.make()
    request = bench.add(1)
    assert bench.queue.abort(1)
    assert request.error is not None and request.error.detail == "aborted by the client"


# ---- the queue ----------------------------------------------------------------------------------------


def test_a_queue_refuses_buffers_and_an_allocator_of_different_block_sizes() -> None:
    config = ReceiverConfig(default_alloc_tokens=8)
    with pytest.raises(ConfigError, match=r"^buffers.block_size=4 differs from allocator.block_size=8$"):
        ReceiverQueue(FakeBuffers(4), FakeAllocator(8, 8), config)


def test_the_lockstep_check_runs_every_lockstep_every_iterations_and_names_the_iteration() -> None:
    peer, bench, _ = two_ranks_transferring(lockstep_every=4)  # one iteration so far
    peer.peer_disagrees = True
    bench.step(2)  # iterations 2 and 3 compare nothing
    with pytest.raises(RankDivergence, match=r"^iteration 4: the ranks' allocator operations differ"):
        bench.step()


def test_with_ranks_a_deadline_is_past_only_after_it_not_at_it() -> None:
    clock = FakeClock()
    _, bench, request = two_ranks_transferring(clock=clock, transfer_timeout_s=10.0)
    clock.t = 10.0
    bench.step()
    assert request.state is State.TRANSFERRING
    clock.t = 10.5
    bench.step()
    assert request.state is State.FAILED and isinstance(request.error, TimedOut)


class CountingLink(FakeLink):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.polls = 0

    def poll(self) -> int:
        self.polls += 1
        return super().poll()


def test_an_aborted_request_that_holds_nothing_is_not_polled_again() -> None:
    bench = Bench.make()
    link = bench.links[1] = CountingLink(KVPoll.Bootstrapping)
    request = bench.queue.add(1, link)
    bench.step()
    assert bench.queue.abort(1) and request.fenced == ()
    polls = link.polls
    assert bench.step() == [request]
    assert link.polls == polls and bench.queue.get(1) is None


def test_a_fence_of_a_request_aborted_since_the_last_iteration_lifts_in_the_next_one() -> None:
    """The abort's own iteration polls the fence: a sender that stopped by then frees the blocks at once."""
    bench = Bench.make()
    request = bench.add(1)
    bench.step()  # init sent for (0, 1)
    assert bench.queue.abort(1) and request.fenced == (0, 1)
    bench.links[1].status = int(KVPoll.Failed)  # the sender stopped
    assert bench.step() == [request]
    assert request.fenced == () and bench.queue.get(1) is None and bench.allocator.free_count == 8


def test_a_request_too_large_for_the_pool_is_told_how_many_blocks_it_needs() -> None:
    bench = Bench.make(num_blocks=2, default_alloc=4)
    request = bench.add(1)
    bench.step()
    bench.land(1, 4 + 9, KVPoll.Transferring)  # a remainder of 9: ceil(9 / 4) = 3 blocks
    bench.step()
    assert request.error is not None and request.error.detail == "needs 3 blocks, the pool has 2"


def progress_request(bench: Bench, total: int, room: int = 1) -> tuple[ProgressLink, Any]:
    """A request whose link reports progress, its init sent; its first chunk of 8 has landed (not yet read)."""
    link = ProgressLink()
    bench.links[room] = link
    request = bench.queue.add(room, link)
    bench.step()
    bench.land(room, total, KVPoll.Transferring)
    link.landed = 8
    return link, request


def test_with_progress_a_remainder_of_one_token_gets_its_block() -> None:
    bench = Bench.make(num_blocks=3)
    link, request = progress_request(bench, total=9)
    bench.step()
    assert request.state is State.RESUMING and link.resumes == [((2,), 8, 4)]


def test_with_progress_an_empty_pool_grants_no_round_of_zero_blocks() -> None:
    bench = Bench.make(num_blocks=4)
    links = {room: ProgressLink() for room in (1, 2)}
    requests = {room: bench.queue.add(room, link) for room, link in links.items()}
    bench.links.update(links)
    bench.step()  # A0 = (0, 1) and (2, 3)
    for room, link in links.items():
        bench.land(room, 30, KVPoll.Transferring)
        link.landed = 8
    bench.step()  # both chunks are read; the first remainder takes every block
    assert links[1].resumes == [((0, 1, 2, 3), 8, 16)]
    assert requests[2].state is State.WAITING_FOR_BLOCKS and links[2].resumes == []


def test_with_ranks_a_sender_s_progress_is_reduced_and_rounds_are_read() -> None:
    peer = PeerRank()
    bench = Bench.make(num_blocks=3, ranks=peer)
    link, request = progress_request(bench, total=30)
    bench.step()
    assert request.state is State.RESUMING and link.resumes == [((2, 0, 1), 8, 12)]
    link.landed = 20
    bench.step()
    assert request.reads == 2 and link.resumes[-1] == ((2, 0, 1), 20, 12)


class RecordingPeer(PeerRank):
    def __init__(self) -> None:
        super().__init__()
        self.compared: list[list[int]] = []

    def same(self, values: Sequence[int]) -> bool:
        self.compared.append(list(values))
        return True


def test_the_lockstep_check_compares_a_fingerprint_of_this_rank_s_allocations() -> None:
    def compared(rooms: int) -> list[int]:
        peer = RecordingPeer()
        bench = Bench.make(ranks=peer, lockstep_every=2)
        for room in range(rooms):
            bench.add(room)
        bench.step(2)  # nothing lands: the only comparison is the lockstep check of iteration 2
        (values,) = peer.compared
        return values

    assert compared(1) == compared(1)
    assert compared(1) != compared(2)


# ---- the request --------------------------------------------------------------------------------------


def test_a_request_is_not_a_warm_up_unless_it_is_said_to_be() -> None:
    from epd_receiver.fsm.config import Wiring, deadlines, poll_table
    from epd_receiver.fsm.request import ReceiverRequest

    spec, config = load_spec(), ReceiverConfig()
    buffers, allocator = FakeBuffers(B), FakeAllocator(8, B)
    wiring = Wiring(
        spec, poll_table(spec), buffers, allocator, config, FakeClock(), deadlines(spec, config), SingleRank()
    )
    assert ReceiverRequest(1, FakeLink(), wiring).warmup is False


def test_a_read_outside_its_window_names_the_room() -> None:
    bench = Bench.make()
    request = bench.add(7)
    bench.step()
    with pytest.raises(ReadOutsideWindow, match=r"^room 7: read of blocks \[0, 1\]; granted: None$"):
        request._window.gather(request.blocks, B, FakePayload(B, 0, [None] * B), 0)
    with pytest.raises(ReadOutsideWindow, match=r"^room 7: aux read of block 0; granted: None"):
        request._window.read_aux(0)


def test_a_value_outside_kvpoll_seen_only_on_another_rank_says_so() -> None:
    peer, bench, request = two_ranks_transferring()
    peer.peer_polls[1] = UNKNOWN_STATUS  # this rank's link returned an honest status
    bench.step()
    assert request.error is not None
    assert request.error.detail == "poll a value outside KVPoll on another rank in TRANSFERRING"


def test_a_link_without_progress_contributes_nothing_landed_to_the_reduce() -> None:
    peer, bench, _ = two_ranks_transferring()
    seen: list[list[int]] = []
    reduce = peer.min_reduce

    def recording(rooms: Sequence[int], values: Sequence[int]) -> list[int]:
        seen.append(list(values))
        return reduce(rooms, values)

    peer.min_reduce = recording  # type: ignore[method-assign]
    bench.step()
    poll, _, _, landed, _ = seen[-1]  # poll, in time, past, landed, sender done
    assert landed == 0 and poll == KVPoll.WaitingForInput


class UnsureLink(FakeLink):
    """A link that raises when asked whether its sender stopped: that is no evidence that it did."""

    def writes_stopped(self) -> bool:
        raise ConnectionError("peer reset")


def test_a_link_that_cannot_say_whether_its_sender_stopped_keeps_the_fence() -> None:
    bench = Bench.make()
    link = bench.links[1] = UnsureLink(KVPoll.WaitingForInput)
    request = bench.queue.add(1, link)
    bench.step()
    assert bench.queue.abort(1) and request.fenced == (0, 1)
    link.status = int(KVPoll.Failed)
    bench.step(3)
    assert request.fenced == (0, 1) and bench.queue.fenced_rooms == (1,)


# ---- what the ranks compare, and what a failure says ----------------------------------------------------


def test_the_ranks_compare_t_s_and_the_checksum_this_rank_read() -> None:
    for checksum, expected in ((None, -1), (0xDEAD, 0xDEAD)):
        peer = RecordingPeer()
        bench = Bench.make(ranks=peer)
        bench.add(1)
        bench.step()
        bench.buffers.aux[0] = AuxRow(20, 7, checksum=checksum)
        bench.links[1].status = int(KVPoll.Transferring)
        bench.step()
        assert peer.compared[0] == [20, 8, expected]  # T, S = |A0|*B, the checksum (-1: none, never a CRC32)


def test_ranks_that_read_different_totals_fail_with_what_this_rank_read() -> None:
    peer, bench, request = two_ranks_transferring()
    peer.peer_disagrees = True
    bench.land(1, 20, KVPoll.Transferring)
    bench.step()
    assert request.error is not None and request.error.room == 1
    assert request.error.detail == "the ranks differ on (T, S, checksum); this rank read [20, 8, -1]"


def test_ranks_compare_the_payload_they_assembled_unless_told_not_to() -> None:
    for compare in (True, False):
        peer = RecordingPeer()
        bench = Bench.make(ranks=peer, compare_payloads=compare)
        request = bench.add(1)
        bench.step()
        bench.land(1, 8, KVPoll.Success)
        bench.step()
        assert request.state is State.SUCCESS and request.payload is not None
        checksum = bench.buffers.checksum(request.payload)
        assert peer.compared == ([[8, 8, -1], [checksum]] if compare else [[8, 8, -1]])


def test_ranks_that_assembled_different_payloads_fail_saying_so() -> None:
    peer, bench, request = two_ranks_transferring()
    answers = iter([True, False])  # the same (T, S, checksum), not the same payload
    peer.same = lambda values: next(answers)  # type: ignore[method-assign]
    bench.land(1, 8, KVPoll.Success)
    bench.step()
    assert request.error is not None and request.error.room == 1
    assert request.error.detail == "the ranks assembled different payloads"


@pytest.mark.parametrize(
    ("total", "status", "detail"),
    [
        (0, KVPoll.Success, "aux[0] of block 0 is 0, outside 1..1000"),
        (6, KVPoll.Transferring, "Transferring, but T=6 fits in the 8 tokens allocated"),
        (9, KVPoll.Success, "Success, but T=9 exceeds the 8 tokens allocated"),
    ],
    ids=["corrupt", "fits", "exceeds"],
)
def test_a_total_that_cannot_be_true_is_named_in_the_error(total: int, status: KVPoll, detail: str) -> None:
    bench = Bench.make(max_total=1000)
    request = bench.add(1)
    bench.step()
    bench.land(1, total, status)
    bench.step()
    assert request.error is not None and request.error.detail == detail


def test_a_landed_count_that_does_not_match_is_named_in_the_error() -> None:
    bench = Bench.make(num_blocks=3)
    link, request = progress_request(bench, total=30)
    link.landed = 7  # a whole A0 holds 8
    bench.step()
    assert request.error is not None
    assert request.error.detail == "the sender reports 7 tokens landed; after 0 the allocation holds 8"


@pytest.mark.parametrize("broken", ["init", "resume"])
def test_a_link_that_raised_is_named_with_what_it_was_asked(broken: str) -> None:
    bench = Bench.make()
    link = bench.links[1] = BrokenLink(broken)
    request = bench.queue.add(1, link)
    bench.step()
    if broken == "resume":
        bench.land(1, 20, KVPoll.Transferring)
        bench.step()
    state = request.state.name
    bench.step()
    assert request.error is not None
    assert request.error.detail == f"poll link_error in {state}: {broken} raised ConnectionError('peer reset')"


class AbortRaisingLink(FakeLink):
    def abort(self) -> None:
        super().abort()
        raise ConnectionError("peer reset")


@pytest.mark.parametrize("how", ["abort", "sender failed"])
def test_a_link_that_raises_when_told_of_the_failure_does_not_stop_the_failure(how: str) -> None:
    bench = Bench.make()
    link = bench.links[1] = AbortRaisingLink(KVPoll.WaitingForInput)
    request = bench.queue.add(1, link)
    bench.step()
    if how == "abort":
        assert bench.queue.abort(1)
    else:
        link.status = int(KVPoll.Failed)
    bench.step()
    assert request.state is State.FAILED and link.aborts == 1


# ---- parsing the spec afresh ---------------------------------------------------------------------------
# load_spec() hands out the packaged spec parsed once per process; these parse its text again.

RECEIVER_MD = Path(__file__).parents[2] / "spec" / "RECEIVER.md"


def fresh_spec() -> ReceiverSpec:
    return load_spec(default_spec_text())


def test_a_fresh_parse_of_the_packaged_text_is_the_packaged_spec() -> None:
    assert fresh_spec() == load_spec()


def test_a_fresh_parse_of_the_packaged_text_draws_the_committed_document() -> None:
    document = RECEIVER_MD.read_text(encoding="utf-8")
    assert sync_generated(document, fresh_spec()) == document


def test_a_fresh_parse_keeps_every_doc_of_the_text() -> None:
    raw = tomllib.loads(default_spec_text())
    spec = fresh_spec()
    for table, parsed in (("events", spec.events), ("actions", spec.actions), ("guards", spec.guards)):
        assert parsed == {name: body["doc"] for name, body in raw[table].items()}, table
        assert all(parsed.values()), table
    assert spec.state_docs == {State[name]: body["doc"] for name, body in raw["states"].items()}


def test_a_fresh_parse_has_the_packaged_machine_causes_and_deadlines() -> None:
    from epd_receiver.fsm import errors
    from epd_receiver.fsm.spec import Guards, PollOutcome, TimeoutSpec

    spec = fresh_spec()
    assert (spec.initial, spec.terminal, spec.on_error) == (
        State.BOOTSTRAPPING,
        frozenset({State.SUCCESS, State.FAILED}),
        "fail",
    )
    assert spec.causes == {
        "timeout": errors.TimedOut,
        "sender_failed": errors.SenderFailed,
        "premature_status": errors.ProtocolViolation,
        "status_regression": errors.ProtocolViolation,
        "unknown_status": errors.ProtocolViolation,
        "transport_failed": errors.TransportFailed,
    }
    assert spec.unknown_poll == PollOutcome("fail", "unknown_status")
    assert spec.link_error_poll == PollOutcome("fail", "transport_failed")
    stopped = PollOutcome("sender_stopped", enabled_if=(Guards(("holds_fence", "senders_stopped")),))
    assert spec.unknown_polls == {State.FAILED: stopped} and spec.link_error_polls == {State.FAILED: stopped}
    assert spec.timeouts[State.FAILED] == TimeoutSpec("drain_timeout_s", "drain_expired")
    assert spec.timeouts[State.RESUMING] == TimeoutSpec("resume_timeout_s", "fail", "timeout")
    assert len(spec.timeouts) == 6
    assert spec.transitions_from(State.SUCCESS)[0].internal
    assert spec.polls[State.FAILED][KVPoll.Success] == stopped


def test_an_entry_without_a_doc_has_an_empty_one() -> None:
    raw = tomllib.loads(default_spec_text())
    raw["states"]["FAILED"] = {}
    for table in ("events", "actions", "guards"):
        raw[table][f"undocumented_{table}"] = {"note": "no doc"}
    spec = load_spec(dump_toml(raw))
    assert spec.state_docs[State.FAILED] == ""
    assert (spec.events["undocumented_events"], spec.actions["undocumented_actions"]) == ("", "")
    assert spec.guards["undocumented_guards"] == ""


def test_a_spec_without_states_is_refused_as_inconsistent() -> None:
    raw = tomllib.loads(default_spec_text())
    del raw["states"]
    with pytest.raises(SpecError, match=r"states in spec \[\] differ"):
        load_spec(dump_toml(raw))


@pytest.mark.parametrize("table", ["events", "actions", "guards", "transitions", "causes", "polls"])
def test_a_spec_missing_a_whole_table_is_refused_as_inconsistent(table: str) -> None:
    raw = tomllib.loads(default_spec_text())
    del raw[table]
    with pytest.raises(SpecError):
        load_spec(dump_toml(raw))


def test_a_spec_that_says_nothing_of_a_link_error_is_refused() -> None:
    raw = tomllib.loads(default_spec_text())
    del raw["polls"]["link_error"]
    with pytest.raises(SpecError, match=r"^polls\.link_error must be 'fail:CAUSE'"):
        load_spec(dump_toml(raw))


def _one_transition(**changes: Any) -> dict[str, Any]:
    """An overlay that replaces BOOTSTRAPPING's handshake_done transition with ``changes`` applied."""
    transition = {"trigger": "handshake_done", "source": "BOOTSTRAPPING", "dest": "WAITING_FOR_INPUT", **changes}
    return {"transitions": [transition]}


@pytest.mark.parametrize(
    ("overlay", "where"),
    [
        ({"machine": {"terminal": ["SUCCESS", "LIMBO"]}}, "machine.terminal: unknown state 'LIMBO'"),
        ({"polls": {"unknown": "fail:gremlins"}}, "polls.unknown: cause 'gremlins' not declared"),
        ({"polls": {"link_error": "fail:gremlins"}}, "polls.link_error: cause 'gremlins' not declared"),
        ({"polls": {"LIMBO": {"Failed": "noop"}}}, "polls: unknown state 'LIMBO'"),
        ({"polls": {"RESUMING": {"Sucess": "noop"}}}, "polls.RESUMING: 'Sucess' is not a KVPoll value"),
        ({"polls": {"RESUMING": {"Failed": "fail:gremlins"}}}, "polls.RESUMING.Failed: cause 'gremlins' not declared"),
        ({"polls": {"RESUMING": {"unknown": "fail:gremlins"}}}, "polls.RESUMING.unknown: cause 'gremlins'"),
        ({"machine": {"initial": "LIMBO"}}, "machine.initial: unknown state 'LIMBO'"),
        ({"timeouts": {"LIMBO": "resume_timeout_s"}}, "timeouts: unknown state 'LIMBO'"),
        ({"timeouts": {"RESUMING": {"event": "fail"}}}, "timeouts.RESUMING: a field name"),
        (_one_transition(trigger="teleport"), "transition 'teleport': event not declared under [events]"),
        (_one_transition(reads="aux"), "transition 'handshake_done': reads is a list"),
        (
            _one_transition(reads=["disk"]),
            "transition 'handshake_done': undeclared actions [], guards [], reads ['disk']",
        ),
        (_one_transition(source="LIMBO"), "transition 'handshake_done': unknown state 'LIMBO'"),
        (_one_transition(dest="LIMBO"), "transition 'handshake_done': unknown state 'LIMBO'"),
        (
            {"polls": {"RESUMING": {"Failed": "fail"}}},
            "polls.RESUMING.Failed: 'fail' needs a cause: write 'fail:CAUSE'",
        ),
        ({"polls": {"WAITING_FOR_BLOCKS": {"Success": "payload_landed"}}}, "polls.WAITING_FOR_BLOCKS.Success: no tr"),
        (
            {"polls": {"RESUMING": {"Transferring": "round_landed if sender_progressed"}}},
            "polls.RESUMING.Transferring: 'round_landed if sender_progressed': a cell names noop, one event",
        ),
        (
            {"polls": {"FAILED": {"unknown": "fail:unknown_status"}}},
            "polls.FAILED.unknown: a terminal",
        ),
        (
            {"polls": {"RESUMING": {"unknown": "handshake_done"}}},
            "polls.RESUMING.unknown: no transition",
        ),
        ({"timeouts": {"SUCCESS": "transfer_timeout_s"}}, "timeouts.SUCCESS: no transition for 'fail'"),
    ],
    ids=[
        "terminal",
        "unknown",
        "link_error",
        "state",
        "value",
        "cell",
        "special-cell",
        "initial",
        "timeouts",
        "timeout-table",
        "event",
        "reads-string",
        "reads-kind",
        "source",
        "dest",
        "fail-without-cause",
        "cell-fires-nothing",
        "cell-guard",
        "terminal-special",
        "special-fires-nothing",
        "deadline-fires-nothing",
    ],
)
def test_a_spec_error_says_where_it_is(overlay: dict[str, Any], where: str) -> None:
    with pytest.raises(SpecError, match=f"^{re.escape(where)}"):
        load_spec(overlay=overlay)


def test_a_state_s_own_rule_for_a_value_outside_kvpoll_fails_with_its_cause() -> None:
    from epd_receiver.fsm.spec import PollOutcome

    spec = load_spec(overlay={"polls": {"RESUMING": {"unknown": "fail:premature_status"}}})
    assert spec.unknown_poll_in(State.RESUMING) == PollOutcome("fail", "premature_status")
    assert spec.unknown_poll_in(State.TRANSFERRING) == PollOutcome("fail", "unknown_status")


def test_a_spec_without_deadlines_loads_and_waits_forever() -> None:
    raw = tomllib.loads(default_spec_text())
    del raw["timeouts"]
    spec = load_spec(dump_toml(raw))
    assert spec.timeouts == {}
    from epd_receiver.fsm.config import deadlines

    assert deadlines(spec, ReceiverConfig()) == {}


def test_deadlines_without_a_timeout_cause_are_refused_saying_so() -> None:
    raw = tomllib.loads(default_spec_text())
    del raw["causes"]["timeout"]
    with pytest.raises(SpecError, match=r"^timeouts need a `timeout` entry under \[causes\]$"):
        load_spec(dump_toml(raw))


def test_a_read_before_any_event_is_outside_every_window() -> None:
    bench = Bench.make()
    request = bench.add(3)
    with pytest.raises(ReadOutsideWindow, match=r"^room 3: aux read of block 0; granted: None \(only A0\[0\]\)$"):
        request._window.read_aux(0)
    with pytest.raises(ReadOutsideWindow, match=r"^room 3: read of blocks \[0\]; granted: None$"):
        request._window.gather((0,), B, FakePayload(B, 0, [None] * B), 0)


def test_an_unknown_status_treated_as_harmless_is_refused_saying_why() -> None:
    expected = "polls.unknown must be 'fail:CAUSE': an unknown status is never harmless"
    with pytest.raises(SpecError, match=f"^{re.escape(expected)}$"):
        load_spec(overlay={"polls": {"unknown": "noop"}})
