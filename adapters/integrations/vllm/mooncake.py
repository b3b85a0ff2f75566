"""The consumer's link factory over the Mooncake transport: ``"link_factory":
"epd_receiver.adapters.integrations.vllm.mooncake:mooncake_link"`` with ``"bootstrap": "host:port"``.

One ``MooncakeReceiver`` per receive pool registers the pool with a transfer engine of its own and finds the
producer through the bootstrap server; it waits once for the producer's hello, so that every link reports
the tokens landed and an item larger than the pool comes in rounds. A room's link is the port's
``MooncakeLink``: statuses and ``writes_stopped()`` are only ever what the producer said.
"""

from __future__ import annotations

import weakref
from typing import Any

from epd_receiver.adapters.integrations.vllm.scheduler import LinkRequest
from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.mooncake.link import Engine, MooncakeReceiver

__all__ = ["mooncake_link", "receiver_for"]

_RECEIVERS: weakref.WeakKeyDictionary[TorchBlockBuffers, MooncakeReceiver] = weakref.WeakKeyDictionary()


def receiver_for(buffers: TorchBlockBuffers, extra: Any) -> MooncakeReceiver:
    """The pool's receiver, made on the first item: an engine, the pool registered, the producer's hello."""
    receiver = _RECEIVERS.get(buffers)
    if receiver is None:
        receiver = MooncakeReceiver(
            Engine(), buffers, str(extra["bootstrap"]), 0, connect_timeout_s=float(extra.get("connect_timeout_s", 30))
        )
        receiver.connect(wait_s=float(extra.get("hello_timeout_s", 5)))
        _RECEIVERS[buffers] = receiver
    return receiver


def mooncake_link(request: LinkRequest) -> Any:
    """The item's room on the producer, as a progress link when the producer speaks the extension."""
    receiver = receiver_for(request.buffers, request.extra)
    receiver.forget(request.room)  # an earlier fetch of the same item, long retired by the controller
    return receiver.link(request.room, progress=True)
