"""The Encode side's decisions, without sockets: who waits for whom, what each chunk writes, who hears what.

Two Language ranks share one room here (``required_dst_info_num = 2``), one that announced our extension
and one that speaks only the fork's wire, so every answer is checked in both dialects.
"""

from __future__ import annotations

import pytest

from epd_receiver.adapters.ports.mooncake import wire
from epd_receiver.adapters.ports.mooncake.desk import FAIL_ON_RESUME, EncodeDesk, RoomPlan

B = 4
EXT, FORK = "127.0.0.1:9001", "127.0.0.1:9002"  # engine sessions
EXT_PULL, FORK_PULL = "127.0.0.1:9101", "127.0.0.1:9102"  # their PULL sockets


def registration(session: str, port: int, features: frozenset[str] = frozenset()) -> list[bytes]:
    return wire.encode_registration(wire.Registration("127.0.0.1", port, session, (10, 20, 30, 40), features))


def init(session: str, port: int, room: int = 5, blocks: tuple[int, ...] = (0, 1), required: int = 2) -> list[bytes]:
    return wire.encode_transfer(
        wire.TransferRequest(room, "127.0.0.1", port, session, blocks, required, len(blocks) * B)
    )


def resume(session: str, port: int, blocks: tuple[int, ...], sent: int, room: int = 5) -> list[bytes]:
    message = wire.TransferRequest(room, "127.0.0.1", port, session, blocks, 2, len(blocks) * B, sent)
    return wire.encode_transfer(message)


def desk_with_both(total: int = 3 * B + 1, fault: str | None = None) -> EncodeDesk:
    desk = EncodeDesk("127.0.0.1:7000")
    desk.begin(B, 4, [RoomPlan(5, total, seed=1, fault=fault)])
    desk.receive(registration(EXT, 9101, wire.FEATURES), "t")
    desk.receive(registration(FORK, 9102), "t")
    return desk


def sent(desk: EncodeDesk) -> list[tuple[str, list[bytes]]]:
    outbox, desk.outbox = desk.outbox, []
    return outbox


def test_only_a_peer_that_announced_the_extension_is_greeted() -> None:
    desk = desk_with_both()
    assert sent(desk) == [(EXT_PULL, [wire.EXT_TAG, b"hello", b"127.0.0.1:7000"])]
    assert desk.peers[EXT].extended and not desk.peers[FORK].extended


def test_a_room_starts_once_every_required_rank_sent_its_init() -> None:
    desk = desk_with_both()
    desk.receive(init(EXT, 9101), "t")
    assert desk.next_room() is None
    desk.receive(init(FORK, 9102), "t")
    assert desk.next_room() == 5


def test_a_first_chunk_follows_the_fork_s_arithmetic_and_each_dialect_hears_its_own_status() -> None:
    desk = desk_with_both(total=3 * B + 1)
    sent(desk)
    desk.receive(init(EXT, 9101, blocks=(7, 3)), "t")
    desk.receive(init(FORK, 9102, blocks=(1, 2)), "t")
    writes = desk.writes(desk.next_room() or -1)
    assert not isinstance(writes, str)
    first = writes[0]
    assert (first.start, first.tokens, first.with_aux, first.partial) == (0, 2 * B, True, True)
    assert first.pairs == ((0, 7, B), (1, 3, B)) and first.pointers == (10, 20, 30, 40)
    for write in writes:
        desk.landed(5, write.session, write.tokens)
    desk.finish_chunk(5, partial=True)
    assert sent(desk) == [(EXT_PULL, [b"5", b"3", b"8"]), (FORK_PULL, [b"5", b"3"])]  # the fork unpacks two


def test_a_resume_waits_for_every_rank_and_restarts_at_the_block_of_sent_tokens() -> None:
    desk = desk_with_both(total=3 * B + 1)
    desk.receive(init(EXT, 9101), "t")
    desk.receive(init(FORK, 9102), "t")
    desk.receive(resume(EXT, 9101, (4,), 2 * B), "t")  # before any Transferring: nothing waits for it
    assert desk.dropped == {wire.STALE: 1}
    room = desk.next_room()
    assert room == 5
    for write in desk.writes(room):  # type: ignore[union-attr]
        desk.landed(room, write.session, write.tokens)
    desk.finish_chunk(room, partial=True)
    desk.receive(resume(EXT, 9101, (4, 6), 2 * B), "t")
    desk.receive(resume(EXT, 9101, (4, 6), 2 * B), "t")
    assert desk.next_room() is None and desk.dropped[wire.DUPLICATE] == 1
    desk.receive(resume(FORK, 9102, (8, 9), 2 * B), "t")
    assert desk.next_room() == 5
    writes = desk.writes(5)
    assert not isinstance(writes, str)
    assert [(w.start, w.tokens, w.with_aux, w.partial) for w in writes] == [(2 * B, B + 1, False, False)] * 2
    assert writes[0].pairs == ((0, 4, B), (1, 6, 1))


def test_success_reaches_both_and_ends_the_room() -> None:
    desk = desk_with_both(total=B)
    desk.receive(init(EXT, 9101), "t")
    desk.receive(init(FORK, 9102), "t")
    sent(desk)
    for write in desk.writes(desk.next_room() or -1):  # type: ignore[union-attr]
        desk.landed(5, write.session, write.tokens)
    desk.finish_chunk(5, partial=False)
    assert sent(desk) == [(EXT_PULL, [b"5", b"4", b"4"]), (FORK_PULL, [b"5", b"4"])]
    desk.receive(resume(EXT, 9101, (1,), B), "t")
    assert not desk.rooms and desk.dropped == {wire.STALE: 1}


def test_an_abort_is_acknowledged_and_the_other_rank_is_told_the_room_failed() -> None:
    desk = desk_with_both()
    desk.receive(init(EXT, 9101), "t")
    desk.receive(init(FORK, 9102), "t")
    sent(desk)
    desk.receive(wire.encode_abort(wire.AbortRequest(5, EXT)), "t")
    assert sent(desk) == [(FORK_PULL, [b"5", b"0"]), (EXT_PULL, [wire.EXT_TAG, b"abort-ack", b"5"])]
    assert desk.next_room() is None  # queued, then aborted: nothing is written
    desk.receive(wire.encode_abort(wire.AbortRequest(5, EXT)), "t")  # already over: still acknowledged
    assert sent(desk) == [(EXT_PULL, [wire.EXT_TAG, b"abort-ack", b"5"])] and not desk.dropped


def test_an_abort_from_a_peer_that_announced_nothing_is_refused() -> None:
    desk = desk_with_both()
    desk.receive(wire.encode_abort(wire.AbortRequest(5, FORK)), "t")
    assert desk.dropped == {wire.UNANNOUNCED: 1}


def test_an_init_from_a_session_that_never_registered_is_dropped_not_fatal() -> None:
    desk = desk_with_both()
    desk.receive(init("127.0.0.1:1234", 9999), "t")
    desk.receive(init(EXT, 9101), "t")
    desk.receive(init(EXT, 9101), "t")
    assert desk.dropped == {wire.UNKNOWN_PEER: 1, wire.DUPLICATE: 1}
    assert list(desk.rooms[5].targets) == [EXT]


@pytest.mark.parametrize(("blocks", "allocated"), [((), 0), ((1, 2), 3 * B)])
def test_a_block_size_the_pool_does_not_have_fails_the_room_with_a_reason(
    blocks: tuple[int, ...], allocated: int
) -> None:
    desk = desk_with_both()
    message = wire.TransferRequest(5, "127.0.0.1", 9101, EXT, blocks, 1, allocated)
    desk.receive(wire.encode_transfer(message), "t")
    sent(desk)
    reason = desk.writes(desk.next_room() or -1)
    assert isinstance(reason, str) and "block size mismatch" in reason
    desk.fail(5, reason)
    (endpoint, frames), *_ = sent(desk)
    assert endpoint == EXT_PULL and frames[:2] == [b"5", b"0"] and b"block size mismatch" in frames[3]


def test_an_injected_failure_on_resume_fails_the_room_for_every_rank() -> None:
    desk = desk_with_both(fault=FAIL_ON_RESUME)
    desk.receive(init(EXT, 9101), "t")
    desk.receive(init(FORK, 9102), "t")
    room = desk.next_room()
    assert room == 5
    for write in desk.writes(room):  # type: ignore[union-attr]
        desk.landed(room, write.session, write.tokens)
    desk.finish_chunk(room, partial=True)
    sent(desk)
    desk.receive(resume(EXT, 9101, (2, 3), 2 * B), "t")
    desk.receive(resume(FORK, 9102, (2, 3), 2 * B), "t")
    assert [frames[:2] for _, frames in sent(desk)] == [[b"5", b"0"], [b"5", b"0"]]
    assert not desk.rooms and desk.next_room() is None
