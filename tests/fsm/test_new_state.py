"""A new state takes the spec and one place in code: the State enum. Nothing else names the states.

The test adds HANDSHAKING between BOOTSTRAPPING and WAITING_FOR_INPUT (the sender was seen bootstrapping
and has not confirmed yet) as a release would: a member of the enum (here an extended copy, which is all
the one code place would change) and an overlay with the state's doc, its poll table, its transitions, an
event, and a deadline that reuses an existing ReceiverConfig field. The Machine, the queue's allocation
pass and collection, and the deadline checks must then carry a request through it with a real sender.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, cast

import pytest

from epd_receiver.adapters.kit.judge import STATE_ORDER
from epd_receiver.adapters.ports.allocator import OwningBlockAllocator
from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.clock import ManualClock
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.adapters.ports.sender import InProcessSender
from epd_receiver.fsm import KVPoll, ReceiverConfig, ReceiverQueue, SpecError, State, TimedOut, load_spec
from epd_receiver.fsm.spec import ReceiverSpec

B = 4
D = 2 * B
NEW = "HANDSHAKING"


class _IdentityHashed(Enum):
    """State's own trick, for an enum made by the functional API: members hash by identity."""

    __hash__ = object.__hash__


EXTENDED = cast(type[State], _IdentityHashed("State", [(name, name) for name in [*State.__members__, NEW]]))

OVERLAY: dict[str, Any] = {
    "states": {NEW: {"doc": "The sender was seen bootstrapping; it has not confirmed the handshake. Holds no blocks."}},
    "events": {"sender_seen": {"doc": "The sender reported Bootstrapping: it exists and is getting ready."}},
    "transitions": [
        {"trigger": "sender_seen", "source": "BOOTSTRAPPING", "dest": NEW},
        {"trigger": "handshake_done", "source": NEW, "dest": "WAITING_FOR_INPUT"},
        {
            "trigger": "fail",
            "source": NEW,
            "dest": "FAILED",
            "actions": ["record_error", "notify_sender", "free_blocks"],
        },
    ],
    "polls": {
        "BOOTSTRAPPING": {"Bootstrapping": "sender_seen"},
        NEW: {
            "Failed": "fail:sender_failed",
            "Bootstrapping": "noop",
            "WaitingForInput": "handshake_done",
            "Transferring": "fail:premature_status",
            "Success": "fail:premature_status",
        },
    },
    "timeouts": {NEW: "bootstrap_timeout_s"},
}


def extended_spec() -> ReceiverSpec:
    return load_spec(overlay=OVERLAY, states=EXTENDED)


def rig(clock: ManualClock) -> tuple[InProcessSender, ReceiverQueue[EmbeddingPayload]]:
    pool = TorchBlockBuffers(8, B, 8)
    sender = InProcessSender(pool, bank_rows=64)
    config = ReceiverConfig(default_alloc_tokens=D, bootstrap_timeout_s=5.0)
    queue: ReceiverQueue[EmbeddingPayload] = ReceiverQueue(
        pool, OwningBlockAllocator(8, B), config, clock=clock, spec=extended_spec()
    )
    return sender, queue


def test_the_extended_spec_loads_against_the_extended_enum_only() -> None:
    spec = extended_spec()
    assert [s.name for s in spec.states] == [*State.__members__, NEW]
    assert all(isinstance(s, EXTENDED) for s in spec.states)
    with pytest.raises(SpecError, match="states in spec"):
        load_spec(overlay=OVERLAY)  # fsm.states.State has no HANDSHAKING


def test_a_request_goes_through_the_new_state_to_success_with_a_real_sender() -> None:
    clock = ManualClock()
    sender, queue = rig(clock)
    link = sender.add_room(1, 3 * D, handshake_done=False)
    request = queue.add(1, link)
    seen = [request.state.name]

    def step() -> None:
        queue.step()
        if request.state.name != seen[-1]:
            seen.append(request.state.name)

    step()  # Bootstrapping: the sender is seen
    assert request.state.name == NEW
    step()  # still Bootstrapping: the new state's fast path
    sender.deliver(1)  # the handshake: WaitingForInput
    step()  # handshake_done, then A0 granted in the same pass
    sender.deliver(1)  # A0 lands: Transferring
    step()  # first chunk read, remainder granted, resume sent
    sender.deliver(1)  # the remainder lands: Success
    step()

    assert seen == [
        "BOOTSTRAPPING",
        NEW,
        "TRANSFERRING",
        "RESUMING",
        "SUCCESS",
    ]
    assert request.payload is not None and sender.source(1).mismatches(request.payload) == []
    assert request.blocks and queue.get(1) is request  # held until released, as the spec's SUCCESS is
    queue.release(1)
    assert queue.get(1) is None and request.blocks == ()


def test_the_new_states_deadline_fires_from_the_field_the_spec_names() -> None:
    clock = ManualClock()
    sender, queue = rig(clock)
    request = queue.add(1, sender.add_room(1, D, handshake_done=False))
    queue.step()
    assert request.state.name == NEW
    clock.advance(5.0)
    queue.step()
    assert request.state.name == NEW  # a deadline is past only after it, not at it
    clock.advance(0.5)
    queue.step()

    assert request.state.name == "FAILED" and isinstance(request.error, TimedOut)
    assert request.error.detail == f"{NEW} for more than 5 s"
    assert sender.status(1) is KVPoll.Bootstrapping and queue.get(1) is None


def test_the_judges_state_order_is_the_spec_declaration_order() -> None:
    assert list(STATE_ORDER) == list(load_spec().states)
    assert list(STATE_ORDER.values()) == list(range(len(State)))
