"""The fork's wire and our extension: codecs, and both sides' handling of any frame whatsoever.

Every decoder is fed arbitrary frames (lists of arbitrary bytes, lists mixing wire-like fields and junk,
and mutations of valid messages); it must never raise, and every frame it refuses must be counted as
exactly one drop. The same check is shown to catch a decoder that raises and one that drops silently.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epd_receiver.adapters.ports.mooncake import wire
from epd_receiver.adapters.ports.mooncake.desk import EncodeDesk, RoomPlan
from epd_receiver.adapters.ports.mooncake.inbox import LanguageInbox, RoomView
from epd_receiver.adapters.tools.encode.control import decode_json

B = 4
ENCODE = "127.0.0.1:7000"
EXT_SESSION, FORK_SESSION = "127.0.0.1:9001", "127.0.0.1:9002"

# ---- strategies ------------------------------------------------------------------------------------

FIELDS = st.one_of(
    st.binary(max_size=12),
    st.integers(-3, 2**64).map(lambda n: str(n).encode()),
    st.sampled_from([b"None", wire.EXT_TAG, b"abort", b"hello", b"abort-ack", b"3,7", b"", b"4"]),
    st.sampled_from([ENCODE.encode(), EXT_SESSION.encode(), b"127.0.0.1", b"host:0", b":5", b"\xff\xfe"]),
)


def valid_to_encode() -> list[list[bytes]]:
    return [
        wire.encode_registration(wire.Registration("127.0.0.1", 9101, EXT_SESSION, (1, 2, 3, 4), wire.FEATURES)),
        wire.encode_transfer(wire.TransferRequest(5, "127.0.0.1", 9101, EXT_SESSION, (0, 1), 1, 2 * B)),
        wire.encode_transfer(wire.TransferRequest(5, "127.0.0.1", 9101, EXT_SESSION, (2,), 1, B, 2 * B)),
        wire.encode_abort(wire.AbortRequest(5, EXT_SESSION)),
    ]


def valid_to_language() -> list[list[bytes]]:
    return [
        wire.encode_status(wire.StatusReport(5, 3)),
        wire.encode_status(wire.StatusReport(5, 3, 8)),
        wire.encode_status(wire.StatusReport(5, 0, 8, "write failed")),
        wire.encode_hello(wire.Hello(ENCODE)),
        wire.encode_abort_ack(wire.AbortAck(5)),
    ]


@st.composite
def mutated(draw: st.DrawFn, valid: list[list[bytes]]) -> list[bytes]:
    frames = list(draw(st.sampled_from(valid)))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, max(0, len(frames) - 1)))
        kind = draw(st.sampled_from(["drop", "replace", "flip", "append", "repeat"]))
        if kind == "drop" and frames:
            del frames[i]
        elif kind == "replace" and frames:
            frames[i] = draw(FIELDS)
        elif kind == "flip" and frames and frames[i]:
            j = draw(st.integers(0, len(frames[i]) - 1))
            frames[i] = frames[i][:j] + bytes([frames[i][j] ^ draw(st.integers(1, 255))]) + frames[i][j + 1 :]
        elif kind == "append":
            frames.append(draw(FIELDS))
        elif frames:
            frames.insert(i, frames[i])
    return frames


def frames_for(valid: list[list[bytes]]) -> st.SearchStrategy[list[bytes]]:
    return st.one_of(
        st.lists(st.binary(max_size=40), max_size=10),
        st.lists(FIELDS, max_size=10),
        mutated(valid),
        st.sampled_from(valid),
    )


# ---- the sides under test --------------------------------------------------------------------------


def language_inbox() -> LanguageInbox:
    inbox = LanguageInbox("test rank", extended=True)
    inbox.speakers[ENCODE] = False
    inbox.rooms[5] = RoomView(ENCODE, init_sent=True, abort="sent")
    inbox.rooms[6] = RoomView(ENCODE)
    return inbox


def encode_desk() -> EncodeDesk:
    desk = EncodeDesk(ENCODE)
    desk.begin(B, 4, [RoomPlan(5, 3 * B, seed=1), RoomPlan(6, B, seed=1)])
    desk.receive(
        wire.encode_registration(wire.Registration("127.0.0.1", 9101, EXT_SESSION, (1, 2, 3, 4), {"abort"})), "t"
    )
    desk.receive(wire.encode_registration(wire.Registration("127.0.0.1", 9102, FORK_SESSION, (1, 2, 3, 4))), "t")
    return desk


def assert_total(
    handle: Callable[[list[bytes]], object],
    dropped: Callable[[], int],
    refused: Callable[[list[bytes]], bool],
    frames: st.SearchStrategy[list[bytes]],
) -> None:
    """``handle`` never raises; at most one drop per frame, exactly one for a frame the decoder refused."""

    @settings(max_examples=400)
    @given(frames=frames)
    def check(frames: list[bytes]) -> None:
        before = dropped()
        handle(frames)
        delta = dropped() - before
        assert delta in (0, 1), f"{delta} drops for one frame {frames!r}"
        assert delta == 1 or not refused(frames), f"refused without a counted drop: {frames!r}"

    check()


def test_the_language_side_never_raises_and_counts_every_refused_frame() -> None:
    inbox = language_inbox()  # shared across examples: duplicates and stale frames accumulate too
    assert_total(
        lambda frames: inbox.receive(frames, "fuzz"),
        lambda: inbox.drops.total,
        lambda frames: isinstance(wire.decode_to_language(frames, extended=True), wire.Drop),
        frames_for(valid_to_language()),
    )


def test_the_encode_side_never_raises_and_counts_every_refused_frame() -> None:
    desk = encode_desk()
    assert_total(
        lambda frames: desk.receive(frames, "fuzz"),
        lambda: desk.drops.total,
        lambda frames: isinstance(wire.decode_to_encode(frames), wire.Drop),
        frames_for(valid_to_encode()),
    )


def test_the_check_catches_a_decoder_that_raises() -> None:
    def naive(frames: list[bytes]) -> object:
        return int(frames[0].decode("ascii")), frames[1]  # what a decoder that trusts its peer does

    with pytest.raises(Exception):  # noqa: B017 (whatever the naive decoder raised first)
        assert_total(naive, lambda: 0, lambda frames: False, frames_for(valid_to_language()))


def test_the_check_catches_a_decoder_that_drops_without_counting() -> None:
    def silent(frames: list[bytes]) -> object:
        return wire.decode_to_language(frames, extended=True)  # refuses, but nobody counts it

    with pytest.raises(AssertionError, match="refused without a counted drop"):
        assert_total(
            silent,
            lambda: 0,
            lambda frames: isinstance(wire.decode_to_language(frames, extended=True), wire.Drop),
            frames_for(valid_to_language()),
        )


# ---- known-bad frames, by cause --------------------------------------------------------------------

INIT = wire.encode_transfer(wire.TransferRequest(5, "127.0.0.1", 9101, EXT_SESSION, (0, 1), 1, 2 * B))


@pytest.mark.parametrize(
    ("frames", "cause"),
    [
        ([], wire.TRUNCATED),
        (INIT[:6], wire.TRUNCATED),
        (INIT[:3], wire.TRUNCATED),
        ([*INIT, b"1", b"2"], wire.MALFORMED),
        ([b"five", *INIT[1:]], wire.MALFORMED),
        ([*INIT[:4], b"0,x", *INIT[5:]], wire.MALFORMED),
        ([*INIT[:5], b"0", INIT[6]], wire.MALFORMED),  # required_dst_info_num 0
        ([*INIT[:3], b"no-port", *INIT[4:]], wire.MALFORMED),
        ([b"None", b"127.0.0.1", b"9101", EXT_SESSION.encode(), b"\x00" * 7], wire.MALFORMED),
        ([b"None", b"127.0.0.1", b"9101"], wire.TRUNCATED),
        ([wire.EXT_TAG, b"abort", b"5"], wire.TRUNCATED),
        ([wire.EXT_TAG, b"shutdown", b"5", b"x:1"], wire.MALFORMED),
    ],
)
def test_a_bad_frame_to_the_encode_side_is_dropped_with_its_cause(frames: list[bytes], cause: str) -> None:
    desk = encode_desk()
    desk.receive(frames, "tcp peer 127.0.0.1")
    assert desk.dropped == {cause: 1} and not desk.rooms


@pytest.mark.parametrize(
    ("frames", "cause"),
    [
        ([b"5"], wire.TRUNCATED),
        ([b"5", b"9"], wire.MALFORMED),  # no KVPoll value
        ([b"5", b"3", b"-1"], wire.MALFORMED),
        ([b"5", b"0", b"0", b"\xff"], wire.MALFORMED),
        ([b"5", b"3", b"0", b"r", b"extra"], wire.MALFORMED),
        ([b"77", b"3"], wire.UNKNOWN_ROOM),
        ([b"6", b"2"], wire.DUPLICATE),  # WaitingForInput is what the room already shows
        ([b"6", b"1"], wire.STALE),
        ([wire.EXT_TAG, b"abort-ack", b"6"], wire.STALE),  # no abort was sent for room 6
        ([wire.EXT_TAG, b"hello", b"127.0.0.1:1"], wire.UNKNOWN_PEER),
        ([wire.EXT_TAG, b"bye", b"1"], wire.MALFORMED),
    ],
)
def test_a_bad_frame_to_the_language_side_is_dropped_with_its_cause(frames: list[bytes], cause: str) -> None:
    inbox = language_inbox()
    inbox.receive(frames, "tcp peer 127.0.0.1")
    assert inbox.dropped == {cause: 1}
    assert inbox.rooms[6].status == 2 and not inbox.rooms[6].stopped


def test_a_side_that_announced_no_extension_refuses_extended_frames() -> None:
    inbox = LanguageInbox("fork-like rank", extended=False)
    inbox.rooms[5] = RoomView(ENCODE)
    for frames in ([b"5", b"3", b"8"], [wire.EXT_TAG, b"abort-ack", b"5"]):
        inbox.receive(frames, "peer")
    assert inbox.dropped == {wire.MALFORMED: 1, wire.UNANNOUNCED: 1}


def test_statuses_duplicates_and_late_frames_on_the_language_side(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    inbox = language_inbox()
    for frames in ([b"6", b"3", b"8"], [b"6", b"3", b"8"], [b"6", b"3", b"4"], [b"6", b"4", b"12"], [b"6", b"0"]):
        inbox.receive(frames, "tcp peer 127.0.0.9")
    view = inbox.rooms[6]
    assert (view.status, view.landed, view.stopped) == (4, 12, True)
    assert inbox.dropped == {wire.DUPLICATE: 1, wire.STALE: 2}
    assert "tcp peer 127.0.0.9 (room 6): stale" in caplog.text


def test_an_abort_is_stopped_only_by_its_acknowledgement() -> None:
    inbox = language_inbox()
    assert not inbox.rooms[5].stopped
    inbox.receive(wire.encode_abort_ack(wire.AbortAck(5)), "peer")
    inbox.receive(wire.encode_abort_ack(wire.AbortAck(5)), "peer")
    assert inbox.rooms[5].stopped and inbox.dropped == {wire.DUPLICATE: 1}


# ---- codecs ----------------------------------------------------------------------------------------

UINT = st.integers(0, 2**40)


@given(
    room=st.integers(0, 2**63 - 1),
    blocks=st.lists(UINT, max_size=20),
    required=st.integers(1, 8),
    allocated=UINT,
    sent=st.none() | UINT,
)
def test_transfer_requests_round_trip(
    room: int, blocks: list[int], required: int, allocated: int, sent: int | None
) -> None:
    message = wire.TransferRequest(room, "10.0.0.7", 5000, "10.0.0.7:15000", tuple(blocks), required, allocated, sent)
    frames = wire.encode_transfer(message)
    assert len(frames) == (7 if sent is None else 8)
    assert wire.decode_to_encode(frames) == message


@given(pointers=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=5), extended=st.booleans())
def test_registrations_round_trip_and_pack_each_pointer_as_uint64(pointers: list[int], extended: bool) -> None:
    features = wire.FEATURES if extended else frozenset()
    message = wire.Registration("10.0.0.7", 5000, "10.0.0.7:15000", tuple(pointers), features)
    frames = wire.encode_registration(message)
    assert frames[0] == b"None" and frames[4] == struct.pack(f"{len(pointers)}Q", *pointers)
    assert len(frames) == 5 + extended
    assert wire.decode_to_encode(frames) == message


@given(room=st.integers(0, 2**63 - 1), status=st.integers(0, 4), landed=st.none() | UINT, reason=st.none() | st.text())
def test_statuses_round_trip(room: int, status: int, landed: int | None, reason: str | None) -> None:
    message = wire.StatusReport(room, status, landed, None if landed is None else reason)
    decoded = wire.decode_to_language(wire.encode_status(message), extended=True)
    assert isinstance(decoded, wire.StatusReport)
    assert (decoded.room, decoded.status, decoded.landed) == (room, status, landed)


@given(frame=st.binary(max_size=64) | st.text(max_size=40).map(str.encode))
def test_the_control_plane_decoder_is_total(frame: bytes) -> None:
    message = decode_json(frame)
    assert message is None or isinstance(message["op"], str)
