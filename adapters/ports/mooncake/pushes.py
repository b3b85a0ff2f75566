"""The PUSH sockets one side of the wire keeps to the other side's endpoints, and the Encode side's outbox.

Every party speaks to a peer by connecting a PUSH socket to the PULL endpoint the peer announced (the
fork's pattern: ``conn_multimodal.py`` keeps one socket per endpoint). A socket is made on first use and
kept; a peer that is gone just does not read what is queued for it (``LINGER`` 0, sends never block).
"""

from __future__ import annotations

import logging

import zmq

from epd_receiver.adapters.ports.mooncake.desk import EncodeDesk

logger = logging.getLogger(__name__)


class Pushes:
    """One PUSH socket per peer endpoint (``host:port``), connected on first use."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self._context = context or zmq.Context.instance()
        self._sockets: dict[str, zmq.Socket[bytes]] = {}

    def send(self, endpoint: str, frames: list[bytes]) -> None:
        """Queue ``frames`` for ``endpoint`` without blocking; a full or failed socket raises ``zmq.ZMQError``."""
        socket = self._sockets.get(endpoint)
        if socket is None:
            socket = self._sockets[endpoint] = self._context.socket(zmq.PUSH)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(f"tcp://{endpoint}")
        socket.send_multipart(frames, flags=zmq.NOBLOCK)

    def close(self) -> None:
        """Close every socket; the next send to an endpoint connects anew."""
        for socket in self._sockets.values():
            socket.close(linger=0)
        self._sockets.clear()


def flush_outbox(desk: EncodeDesk, pushes: Pushes, side: str) -> None:
    """Send what the Encode side's desk has to say; a Language rank that is gone just misses it (logged)."""
    outbox, desk.outbox = desk.outbox, []
    for endpoint, frames in outbox:
        try:
            pushes.send(endpoint, frames)
        except zmq.ZMQError as error:
            logger.warning("%s: cannot report to %s: %s", side, endpoint, error)
