"""Our receiver's links against a stand-in of the fork's Encode side (``fork_wire_fakes.ForkEncode``).

The frames our link sends must be exactly what the fork parses, the fork must never meet a frame it
cannot parse (no abort, however often we abort), and only what the fork reports may say that its writes
stopped. No transfer engine is needed: nothing here moves data, so a stand-in engine names the session.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch
from support.fork_wire_fakes import ForkEncode, Parsed

from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.mooncake import wire
from epd_receiver.adapters.ports.mooncake.bootstrap import BootstrapServer
from epd_receiver.adapters.ports.mooncake.link import MooncakeLink, MooncakeReceiver, ProgressMooncakeLink
from epd_receiver.fsm import KVPoll

B = 4


class SessionOnly:
    """The engine as far as the wire sees it: a session id (host:port) and memory registration."""

    session = "127.0.0.1:4242"

    def register(self, tensors: Sequence[torch.Tensor]) -> None:
        pass

    def unregister(self, tensors: Sequence[torch.Tensor]) -> None:
        pass


@pytest.fixture
def pair() -> Iterator[tuple[MooncakeReceiver, ForkEncode]]:
    server = BootstrapServer()
    fork = ForkEncode(server.address)
    buffers = TorchBlockBuffers(8, B, 8)
    receiver = MooncakeReceiver(SessionOnly(), buffers, server.address, rank=0)
    yield receiver, fork
    receiver.close()
    fork.close()
    server.close()


def opened(pair: tuple[MooncakeReceiver, ForkEncode], room: int, block: int) -> tuple[MooncakeLink, Parsed]:
    """Our receiver registered with the fork's Encode side, and ``room``'s init (one block) as it parsed it."""
    receiver, fork = pair
    receiver.connect(wait_s=0.2)
    fork.pump()
    link = receiver.link(room)
    link.init([block], B)
    (init,) = fork.pump()
    return link, init


def settle(receiver: MooncakeReceiver, link: MooncakeLink, status: int) -> None:
    for _ in range(200):
        if link.poll() == status:
            return
        receiver.wait(0.01)
    raise AssertionError(f"room {link.room} never reached {status}: {link.poll()}")


def test_our_frames_parse_as_the_fork_parses_them(pair: tuple[MooncakeReceiver, ForkEncode]) -> None:
    receiver, fork = pair
    assert receiver.connect(wait_s=0.3) is False  # the fork's Encode says no hello: no extension
    (registration,) = fork.pump()
    pointers, _, _ = receiver.buffers.get_buf_infos()
    assert registration.kind == "registration" and registration.session == SessionOnly.session
    assert registration.fields == {"endpoint": "127.0.0.1", "port": receiver.port, "pointers": pointers}
    link = receiver.link(7, progress=True)
    assert not isinstance(link, ProgressMooncakeLink)  # a fork peer reports no landed count
    assert link.poll() == KVPoll.WaitingForInput  # as the fork's receiver, once bootstrapped
    link.init([3, 4], 2 * B)
    (init,) = fork.pump()
    assert (init.kind, init.room) == ("init", 7)
    assert init.fields == {
        "endpoint": "127.0.0.1",
        "port": receiver.port,
        "blocks": [3, 4],
        "required_dst_info_num": 1,
        "allocated_tokens": 2 * B,
    }
    fork.report(init, KVPoll.Transferring)
    settle(receiver, link, KVPoll.Transferring)
    link.resume([5, 6], 2 * B, 2 * B)
    (resume,) = fork.pump()
    assert resume.kind == "resume"
    assert (resume.fields["blocks"], resume.fields["sent_tokens"], resume.fields["allocated_tokens"]) == (
        [5, 6],
        2 * B,
        2 * B,
    )
    assert fork.died is None


def test_an_abort_never_reaches_the_fork_and_only_its_own_report_stops_the_writes(
    pair: tuple[MooncakeReceiver, ForkEncode],
) -> None:
    receiver, fork = pair
    link, init = opened(pair, 9, 0)
    link.abort()
    link.abort()
    assert fork.pump(timeout_ms=200) == [] and fork.died is None  # the fork could not have parsed it
    assert not link.writes_stopped()  # our own abort is no evidence that the fork stopped
    fork.report(init, KVPoll.Success)
    settle(receiver, link, KVPoll.Success)
    assert link.writes_stopped()


def test_a_failed_report_stops_the_writes_and_explains_itself(pair: tuple[MooncakeReceiver, ForkEncode]) -> None:
    receiver, fork = pair
    link, init = opened(pair, 3, 1)
    fork.report(init, KVPoll.Failed)
    settle(receiver, link, KVPoll.Failed)
    assert link.writes_stopped()
    assert "reported Failed" in (link.failure_reason() or "")


def test_junk_from_the_encode_side_fails_no_request(pair: tuple[MooncakeReceiver, ForkEncode]) -> None:
    receiver, fork = pair
    link, init = opened(pair, 4, 1)
    fork.report(init, KVPoll.Transferring)
    push = fork.pushes[f"tcp://127.0.0.1:{receiver.port}"]
    for junk in ([b"4"], [b"4", b"three"], [b"99", b"3"], [b"4", b"3", b"1", b"2", b"3"], [b"\xff" * 9, b"1"]):
        push.send_multipart(junk)
    fork.report(init, KVPoll.Success)
    settle(receiver, link, KVPoll.Success)
    assert receiver.dropped == {"truncated": 1, "malformed": 3, "unknown_room": 1}


def test_an_abort_waits_for_the_encode_rank_to_say_it_understands_one(
    pair: tuple[MooncakeReceiver, ForkEncode],
) -> None:
    """A peer that says hello late (ours, slow) still gets the abort, then its acknowledgement stops the writes."""
    receiver, fork = pair
    receiver.connect(wait_s=0.1)
    fork.pump()  # the registration
    link = receiver.link(2)
    link.init([0], B)
    (init,) = fork.pump()
    link.abort()
    assert not fork.pull.poll(100)  # no hello yet: nothing sent
    fork.report(init, KVPoll.Transferring)  # opens the push socket towards the receiver
    push = fork.pushes[f"tcp://127.0.0.1:{receiver.port}"]
    push.send_multipart([wire.EXT_TAG, b"hello", f"127.0.0.1:{fork.port}".encode()])
    settle(receiver, link, KVPoll.Transferring)
    assert fork.pull.poll(2000)
    assert fork.pull.recv_multipart() == [wire.EXT_TAG, b"abort", b"2", SessionOnly.session.encode()]
    assert not link.writes_stopped()
    push.send_multipart(wire.encode_abort_ack(wire.AbortAck(2)))
    for _ in range(200):
        if link.writes_stopped():
            break
        receiver.wait(0.01)
    assert link.writes_stopped() and receiver.dropped == {}


def test_after_one_refused_write_the_fork_fails_every_later_room_of_the_session(
    pair: tuple[MooncakeReceiver, ForkEncode],
) -> None:
    """The fork's Encode marks a session failed at its first refused write and reports Failed, writing
    nothing, for every later room of it (conn_multimodal.py:388-410, 441-461): each is evidence that the
    sender stopped, so our links fence nothing; a new registration would clear it."""
    receiver, fork = pair
    refused, init = opened(pair, 5, 1)
    fork.fail(init)
    settle(receiver, refused, KVPoll.Failed)
    later = receiver.link(6)
    later.init([2], B)
    (second,) = fork.pump()
    fork.report(second, KVPoll.Success)  # what it would have said; the failed session turns it into Failed
    settle(receiver, later, KVPoll.Failed)
    assert refused.writes_stopped() and later.writes_stopped()
