"""The SGLang fork's embedding wire, frame by frame, and our optional extension of it; codecs only, no sockets.

Both directions are ZMQ PUSH to the other side's PULL socket, every field an ASCII frame (ZhengWG/sglang at
cca20b0, ``python/sglang/srt/disaggregation/mooncake/conn_multimodal.py``, cited below as ``conn:LINE``):

* Language -> Encode, registration: ``["None", ip, rank_port, session, pointers]``, the pool's base pointers
  packed as native uint64 each (``conn:1086-1107``; read back at ``conn:127-134`` and ``conn:512-521``).
* Language -> Encode, init: ``[room, ip, rank_port, session, "3,7,9", required_dst_info_num,
  allocated_tokens]`` (``conn:1118-1160``) and resume, 8 frames: ``..., sent_tokens, allocated_tokens``
  (``conn:1162-1195``); the Encode tells them apart by count alone (``conn:78-115``, ``conn:526``).
* Encode -> Language, status: ``[room, status]`` with a KVPoll value (``conn:369-379``), sent to the
  ip and port named in the init; the Language thread unpacks exactly two frames (``conn:632-642``).

The fork's wire cannot say "abort", "I stopped", "this many tokens have landed" or why a transfer failed.
Our extension adds them without a fork peer ever seeing one: our Language side appends one frame,
``EXT_TAG + b" " + features``, to its registration (the fork's Encode reads frames 0-4 only,
``conn:127-134``); our Encode answers only such a peer with a hello naming itself, and only then sends it
extended statuses ``[room, status, landed]`` / ``[room, status, landed, reason]`` and abort
acknowledgements ``[EXT_TAG, "abort-ack", room]``. Our Language side sends ``[EXT_TAG, "abort", room,
session]`` only to an Encode peer whose hello it has seen: the fork's Encode would try to read an
init out of it and its thread would die (``conn:510-526``).

Every decoder here is total: whatever the frames, it returns a message or a ``Drop`` naming the cause.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter
from dataclasses import dataclass

logger = logging.getLogger(__name__)

EXT_TAG = b"epd-ext/1"
FEATURES = frozenset({"abort", "progress", "reason"})
REGISTRATION_ROOM = b"None"
HELLO, ABORT, ABORT_ACK = b"hello", b"abort", b"abort-ack"

# drop causes: one counter each
TRUNCATED, MALFORMED, DUPLICATE, STALE = "truncated", "malformed", "duplicate", "stale"
UNKNOWN_ROOM, UNKNOWN_PEER, UNANNOUNCED = "unknown_room", "unknown_peer", "unannounced"
QUIET = frozenset({DUPLICATE, STALE})  # expected now and then (a fork peer repeats Transferring per round)

KV_FAILED, KV_TRANSFERRING, KV_SUCCESS = 0, 3, 4
KV_VALUES = range(0, 5)  # KVPoll: Failed, Bootstrapping, WaitingForInput, Transferring, Success

_MAX_ROOM = (1 << 63) - 1  # SGLang draws bootstrap rooms from [0, 2**63)
_MAX_COUNT = 1 << 40  # tokens and block indices: far beyond any pool, far below overflow
_MAX_BLOCKS = 1 << 20
_MAX_TEXT = 255
_MAX_REASON = 1024
_MAX_POINTERS = 16


# ---- messages --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Registration:
    """A Language rank announces its pool: where to report, its engine session, its buffers' base pointers."""

    ip: str
    port: int
    session: str
    pointers: tuple[int, ...]
    features: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class TransferRequest:
    """An init (``sent_tokens is None``) or a resume of one room towards one Language rank."""

    room: int
    ip: str
    port: int
    session: str
    blocks: tuple[int, ...]
    required_dst_info_num: int
    allocated_tokens: int
    sent_tokens: int | None = None

    @property
    def is_resume(self) -> bool:
        return self.sent_tokens is not None


@dataclass(frozen=True, slots=True)
class AbortRequest:
    """Extension: the Language rank ``session`` gave up ``room``; stop writing into its blocks, then ack."""

    room: int
    session: str


@dataclass(frozen=True, slots=True)
class StatusReport:
    """The Encode side's status of a room; ``landed`` and ``reason`` only in the extension."""

    room: int
    status: int
    landed: int | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Hello:
    """Extension: the Encode peer at ``endpoint`` (its bootstrap rank_ip:rank_port) speaks the extension."""

    endpoint: str


@dataclass(frozen=True, slots=True)
class AbortAck:
    """Extension: the Encode side will write nothing more into this room's blocks."""

    room: int


@dataclass(frozen=True, slots=True)
class Drop:
    """A frame a decoder refused, and why."""

    cause: str
    detail: str


ToEncode = Registration | TransferRequest | AbortRequest
ToLanguage = StatusReport | Hello | AbortAck


class DropLog:
    """Counts (one counter per cause, ``counts[cause]``) and logs every frame one side refused."""

    def __init__(self, side: str) -> None:
        self.side = side
        self.counts: Counter[str] = Counter()

    def drop(self, cause: str, peer: str, detail: str) -> None:
        self.counts[cause] += 1
        level = logging.INFO if cause in QUIET else logging.WARNING
        logger.log(level, "%s dropped a frame from %s: %s (%s)", self.side, peer, cause, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# ---- encoders --------------------------------------------------------------------------------------


def _ascii(value: object) -> bytes:
    return str(value).encode("ascii")


def encode_registration(message: Registration) -> list[bytes]:
    frames = [REGISTRATION_ROOM, _ascii(message.ip), _ascii(message.port), _ascii(message.session)]
    frames.append(b"".join(struct.pack("Q", pointer) for pointer in message.pointers))
    if message.features:
        frames.append(EXT_TAG + b" " + ",".join(sorted(message.features)).encode("ascii"))
    return frames


def encode_transfer(message: TransferRequest) -> list[bytes]:
    frames = [_ascii(message.room), _ascii(message.ip), _ascii(message.port), _ascii(message.session)]
    frames += [",".join(map(str, message.blocks)).encode("ascii"), _ascii(message.required_dst_info_num)]
    if message.sent_tokens is not None:
        frames.append(_ascii(message.sent_tokens))
    return [*frames, _ascii(message.allocated_tokens)]


def encode_abort(message: AbortRequest) -> list[bytes]:
    return [EXT_TAG, ABORT, _ascii(message.room), _ascii(message.session)]


def encode_status(message: StatusReport) -> list[bytes]:
    """Two frames for a fork peer (no landed count); three or four for a peer that announced the extension."""
    frames = [_ascii(message.room), _ascii(message.status)]
    if message.landed is None:
        return frames
    frames.append(_ascii(message.landed))
    if message.reason is not None:
        clipped = message.reason.encode("utf-8", "replace")[:_MAX_REASON]
        frames.append(clipped.decode("utf-8", "ignore").encode("utf-8"))  # never a character cut in two
    return frames


def encode_hello(message: Hello) -> list[bytes]:
    return [EXT_TAG, HELLO, _ascii(message.endpoint)]


def encode_abort_ack(message: AbortAck) -> list[bytes]:
    return [EXT_TAG, ABORT_ACK, _ascii(message.room)]


# ---- decoders --------------------------------------------------------------------------------------


class _Bad(Exception):
    """Internal: one field is wrong; the decoder turns it into a Drop and nothing else escapes."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause


def _uint(frame: bytes, field: str, limit: int = _MAX_COUNT) -> int:
    if not frame or len(frame) > 20 or not frame.isdigit():
        raise _Bad(MALFORMED, f"{field} is not an ASCII unsigned integer: {frame[:24]!r}")
    value = int(frame)
    if value > limit:
        raise _Bad(MALFORMED, f"{field} {value} exceeds {limit}")
    return value


def _text(frame: bytes, field: str) -> str:
    if not 0 < len(frame) <= _MAX_TEXT or not all(0x21 <= byte <= 0x7E for byte in frame):
        raise _Bad(MALFORMED, f"{field} is not printable ASCII: {frame[:24]!r}")
    return frame.decode("ascii")


def _host_port(frame: bytes, field: str) -> str:
    text = _text(frame, field)
    host, _, port = text.rpartition(":")
    if not host or _uint(port.encode("ascii"), f"{field} port", 65535) == 0:
        raise _Bad(MALFORMED, f"{field} is not host:port: {text!r}")
    return text


def _blocks(frame: bytes) -> tuple[int, ...]:
    if not frame:
        return ()
    parts = frame.split(b",")
    if len(parts) > _MAX_BLOCKS:
        raise _Bad(MALFORMED, f"{len(parts)} block indices")
    return tuple(_uint(part, "block index") for part in parts)


def _pointers(frame: bytes) -> tuple[int, ...]:
    if not frame or len(frame) % 8 or len(frame) // 8 > _MAX_POINTERS:
        raise _Bad(MALFORMED, f"{len(frame)} bytes of packed pointers")
    return struct.unpack(f"{len(frame) // 8}Q", frame)


def _features(frames: list[bytes]) -> frozenset[str]:
    """The extension frame after the five the fork reads; anything else there is ignored, as the fork does."""
    if len(frames) < 6 or not frames[5].startswith(EXT_TAG + b" "):
        return frozenset()
    names = frames[5][len(EXT_TAG) + 1 :].split(b",")
    return frozenset(name.decode("ascii", "replace") for name in names) & FEATURES


def _need(frames: list[bytes], low: int, high: int, what: str) -> None:
    if len(frames) < low:
        raise _Bad(TRUNCATED, f"{what} of {len(frames)} frames, needs {low}")
    if len(frames) > high:
        raise _Bad(MALFORMED, f"{what} of {len(frames)} frames, at most {high}")


def decode_to_encode(frames: list[bytes]) -> ToEncode | Drop:
    """What the Encode side's PULL socket received from a Language rank, or why it is dropped."""
    try:
        return _to_encode(frames)
    except _Bad as bad:
        return Drop(bad.cause, str(bad))


def _to_encode(frames: list[bytes]) -> ToEncode:
    _need(frames, 1, 64, "a message")
    if frames[0] == EXT_TAG:
        _need(frames, 2, 64, "an extension message")
        if frames[1] != ABORT:
            raise _Bad(MALFORMED, f"unknown extension message {frames[1][:24]!r}")
        _need(frames, 4, 4, "an abort")
        return AbortRequest(_uint(frames[2], "room", _MAX_ROOM), _host_port(frames[3], "session"))
    if frames[0] == REGISTRATION_ROOM:
        _need(frames, 5, 64, "a registration")
        ip, port = _text(frames[1], "ip"), _uint(frames[2], "rank_port", 65535)
        session, pointers = _host_port(frames[3], "session"), _pointers(frames[4])
        return Registration(ip, port, session, pointers, _features(frames))
    room = _uint(frames[0], "room", _MAX_ROOM)
    _need(frames, 7, 8, "an init or resume")
    ip, port, session = _text(frames[1], "ip"), _uint(frames[2], "rank_port", 65535), _host_port(frames[3], "session")
    blocks, required = _blocks(frames[4]), _uint(frames[5], "required_dst_info_num", 1024)
    if required < 1:
        raise _Bad(MALFORMED, "required_dst_info_num is 0")
    if len(frames) == 7:
        return TransferRequest(room, ip, port, session, blocks, required, _uint(frames[6], "allocated_tokens"))
    sent, allocated = _uint(frames[6], "sent_tokens"), _uint(frames[7], "allocated_tokens")
    return TransferRequest(room, ip, port, session, blocks, required, allocated, sent)


def decode_to_language(frames: list[bytes], *, extended: bool) -> ToLanguage | Drop:
    """What a Language rank's PULL socket received from an Encode peer, or why it is dropped.

    ``extended``: this rank announced the extension, so extended frames are expected; otherwise only the
    fork's two-frame status is.
    """
    try:
        return _to_language(frames, extended)
    except _Bad as bad:
        return Drop(bad.cause, str(bad))


def _to_language(frames: list[bytes], extended: bool) -> ToLanguage:
    _need(frames, 1, 64, "a message")
    if frames[0] == EXT_TAG:
        if not extended:
            raise _Bad(UNANNOUNCED, "an extension frame, and this side announced none")
        _need(frames, 3, 3, "an extension message")
        if frames[1] == HELLO:
            return Hello(_host_port(frames[2], "endpoint"))
        if frames[1] == ABORT_ACK:
            return AbortAck(_uint(frames[2], "room", _MAX_ROOM))
        raise _Bad(MALFORMED, f"unknown extension message {frames[1][:24]!r}")
    _need(frames, 2, 4 if extended else 2, "a status")
    room, status = _uint(frames[0], "room", _MAX_ROOM), _uint(frames[1], "status", 1 << 8)
    if status not in KV_VALUES:
        raise _Bad(MALFORMED, f"status {status} is no KVPoll value")
    if len(frames) == 2:
        return StatusReport(room, status)
    landed = _uint(frames[2], "landed")
    if len(frames) == 3:
        return StatusReport(room, status, landed)
    if len(frames[3]) > _MAX_REASON:
        raise _Bad(MALFORMED, f"a reason of {len(frames[3])} bytes")
    try:
        reason = frames[3].decode("utf-8")
    except UnicodeDecodeError as error:
        raise _Bad(MALFORMED, f"reason is not UTF-8: {error.reason}") from None
    return StatusReport(room, status, landed, reason)
