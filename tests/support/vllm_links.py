"""The Encode side in process for the vLLM connector's tests: a link factory named in the extra config.

Each receive pool gets its own ``InProcessSender`` (the project's sender port, writing into the pool's rows
as an RDMA write would); an item's source is ``num_embeds`` tokens unless a test sets another size for its hash,
and every room reports progress, so an item larger than the pool arrives in rounds.
"""

from __future__ import annotations

import weakref

from epd_receiver.adapters.integrations.vllm.scheduler import LinkRequest
from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.adapters.ports.sender import InProcessSender
from epd_receiver.adapters.ports.sender_links import SenderLink

FACTORY = "support.vllm_links:in_process_link"

_SENDERS: weakref.WeakKeyDictionary[TorchBlockBuffers, InProcessSender] = weakref.WeakKeyDictionary()
SIZES: dict[str, int] = {}  # mm_hash -> the tokens the producer sends, when not vLLM's count
ROOMS: dict[str, int] = {}  # mm_hash -> the room it was last fetched in
UNREACHABLE: set[str] = set()  # items whose producer cannot be reached: building their link raises


def sender_for(buffers: TorchBlockBuffers) -> InProcessSender:
    sender = _SENDERS.get(buffers)
    if sender is None:
        sender = _SENDERS[buffers] = InProcessSender(buffers, seed=7, async_abort=True)
    return sender


def in_process_link(request: LinkRequest) -> SenderLink:
    ROOMS[request.mm_hash] = request.room
    if request.mm_hash in UNREACHABLE:
        raise ConnectionRefusedError(f"no producer answers for {request.mm_hash}")
    total = SIZES.get(request.mm_hash, request.num_embeds)
    sender = sender_for(request.buffers)
    if request.room in sender.rooms():
        sender.forget(request.room)  # an earlier fetch of the same item, over and done with
    return sender.add_room(request.room, total, progress=True, checksum=True)
