"""The simulation's control plane to the Encode process: not the fork's wire, and never on its sockets.

A real Encode server learns of requests from its own scheduler and is configured at start. The simulated
one learns both here, over a DEALER/ROUTER socket of JSON messages that only tests and the driver use:
``begin`` (the pool geometry both sides share and the rooms to serve: T, seed, checksum, injected fault),
``stats`` (bytes written, write time, dropped frames), ``bench`` (a raw engine write of a given size),
``raw_target`` (scratch memory where every chunk is mirrored by a raw write, for the same-run figure),
``arm_kill`` (die halfway through a resume chunk) and ``stop``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.multiprocessing as mp
import zmq

from epd_receiver.adapters.ports.mooncake.desk import RoomPlan
from epd_receiver.adapters.ports.mooncake.link import HOST, Geometry, SenderUnreachable
from epd_receiver.adapters.ports.ranks import free_port


def send_json(socket: zmq.Socket[bytes], message: dict[str, Any], identity: bytes | None = None) -> None:
    """One JSON message; never blocks (a peer that is gone just does not read it)."""
    frames = [json.dumps(message).encode()]
    socket.send_multipart(([identity] if identity is not None else []) + frames, flags=zmq.NOBLOCK)


def decode_json(frame: bytes) -> dict[str, Any] | None:
    """A control message, or None when the frame is not one."""
    try:
        message = json.loads(frame)
    except (ValueError, UnicodeDecodeError):
        return None
    return message if isinstance(message, dict) and isinstance(message.get("op"), str) else None


class EncodeControl:
    """A client of the control socket: one request, one ``<op>_reply``."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(endpoint)

    def call(self, op: str, timeout_s: float = 10.0, alive: Any = None, **fields: Any) -> dict[str, Any]:
        """Send ``op`` and wait for its reply; ``alive()`` (optional) False means the process died."""
        send_json(self._socket, {"op": op, **fields})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise SenderUnreachable("the Encode process died")
            if self._socket.poll(100):
                reply = decode_json(self._socket.recv())
                if reply is not None and reply["op"] == f"{op}_reply":
                    return reply
        raise SenderUnreachable(f"the Encode process did not answer {op!r} within {timeout_s:g} s")

    def begin(self, geometry: Geometry, plans: Sequence[RoomPlan], timeout_s: float = 30.0) -> None:
        rooms = [dataclasses.astuple(plan) for plan in plans]
        self.call("begin", timeout_s, geometry=dataclasses.astuple(geometry), plans=rooms)

    def stats(self, timeout_s: float = 10.0) -> dict[str, Any]:
        return self.call("stats", timeout_s)

    def bench(self, session: str, total: int, timeout_s: float = 600.0) -> dict[str, Any]:
        """A raw engine write of ``total`` bytes into ``session``'s first buffer, as large as rows allow."""
        return self.call("bench", timeout_s, session=session, bytes=total)

    def raw_target(self, session: str, scratch: torch.Tensor, timeout_s: float = 10.0) -> None:
        """Mirror every chunk of this workload by a raw write into ``scratch``, registered in ``session``."""
        self.call("raw_target", timeout_s, session=session, pointer=scratch.data_ptr(), bytes=scratch.nbytes)

    def close(self) -> None:
        self._socket.close(linger=0)


def _serve(control: str, bootstrap: str, threads: int) -> None:
    from epd_receiver.adapters.tools.encode.server import serve  # the child imports the engine; the parent need not

    serve(control, bootstrap, threads)


class EncodeProcess:
    """The Encode side in a spawned process: it registers with ``bootstrap`` and is driven over ``control``."""

    def __init__(self, bootstrap: str, control: str | None = None, *, start_timeout_s: float = 60.0) -> None:
        self.bootstrap = bootstrap
        self.endpoint = control or f"tcp://{HOST}:{free_port()}"
        self.process = mp.get_context("spawn").Process(
            target=_serve, args=(self.endpoint, bootstrap, 1), daemon=True, name="epd-encode"
        )
        self.process.start()
        self.control = EncodeControl(self.endpoint)
        try:
            self.call("stats", start_timeout_s)
        except BaseException:
            self.kill()
            raise

    def call(self, op: str, timeout_s: float = 10.0, **fields: Any) -> dict[str, Any]:
        return self.control.call(op, timeout_s, alive=self.process.is_alive, **fields)

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def arm_kill(self, resumes: int = 1) -> None:
        """Fault injection: the process kills itself halfway through writing its ``resumes``-th resume chunk."""
        self.call("arm_kill", resumes=resumes)

    @property
    def alive(self) -> bool:
        return bool(self.process.is_alive())

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.alive:
            with contextlib.suppress(SenderUnreachable):
                self.call("stop", timeout_s)
        self.process.join(timeout_s)
        self.kill()

    def kill(self) -> None:
        """End the process by its own pid, at once (also what a crash looks like to the receivers)."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.control.close()
