"""Stand-ins for the two sides of the SGLang fork's embedding transport, written here from what its code does.

Both reproduce the observable behaviour of ZhengWG/sglang at cca20b0,
``python/sglang/srt/disaggregation/mooncake/conn_multimodal.py`` (``conn:LINE`` below); none of its code
is copied. Each parses exactly as the fork does, and where the fork's receiving thread would raise (and
so die, since neither loop catches anything), the fake records ``died`` and stops listening.

``ForkEncode`` is the fork's Encode manager as a Language rank meets it:
  * it registers with the bootstrap server by ``PUT /route`` (``conn:784-808``);
  * its thread reads frame 0 as an ASCII room and frame 3 as the session before anything else
    (``conn:509-511``); room ``"None"`` is a registration whose frames 1-4 it reads, the pointers unpacked
    as ``len // 8`` native uint64 (``conn:127-134``, ``conn:512-521``), any later frame unread;
  * otherwise ``int(room)``, and 8 frames or more are a resume, read as frames 4-7 (``conn:78-115``,
    ``conn:526-545``), fewer an init, read as frames 4-6 with frame 5 the number of Language ranks it
    waits for (``conn:608-626``);
  * it reports ``[room, status]`` in ASCII to the ip and port of the init (``conn:369-379``);
  * one refused write marks the session failed (``conn:441-461``), and from then on its transfer worker
    reports Failed for every chunk of that session without writing (``conn:396-410``); only a new
    registration of the session clears the mark (``conn:512-521``), and a Language rank registers once
    per connection (``conn:1019-1040``).

``ForkLanguage`` is the fork's Language-side manager and receiver, as an Encode side meets it:
  * it asks the bootstrap server for the Encode side's sizes, then for one rank (``conn:1050-1084``),
    targeting it as ``conn:991-1012`` says; a lookup that fails (an error answer, no answer, or sizes of
    None because no Encode rank registered yet, on which ``int()`` raises) leaves the fork's failure
    record (``conn:969-975``, ``conn:1029-1034``) and nothing sent;
  * it registers ``["None", ip, rank_port, session, packed pointers]`` once (``conn:1086-1107``) and sends
    inits of 7 frames (``conn:1118-1160``) and resumes of 8 (``conn:1162-1195``), nothing else: an abort
    stays local (``conn:1224-1230``);
  * its thread unpacks every message into exactly ``(room, status)`` and reads both as ASCII integers
    (``conn:632-642``); a status only rises, except to Failed (``conn:765-775``).
"""

from __future__ import annotations

import json
import struct
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import zmq


def _put(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@dataclass
class Parsed:
    kind: str  # "registration", "init", "resume"
    room: int | None
    session: str
    fields: dict[str, Any] = field(default_factory=dict)


class ForkEncode:
    """The fork's Encode manager, seen from the wire: a PULL socket, its parser, and status pushes."""

    def __init__(self, bootstrap: str, host: str = "127.0.0.1") -> None:
        self.context = zmq.Context.instance()
        self.pull = self.context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.port = self.pull.bind_to_random_port(f"tcp://{host}")
        self.host = host
        self.received: list[Parsed] = []
        self.died: str | None = None
        self.failed_sessions: set[str] = set()
        self.pushes: dict[str, zmq.Socket[bytes]] = {}
        body = {"role": "Encode", "tp_size": 1, "dp_size": 1, "rank_ip": host, "rank_port": self.port}
        _put(f"http://{bootstrap}/route", body | {"engine_rank": 0})

    def pump(self, timeout_ms: int = 1000, expect: int = 1) -> list[Parsed]:
        """Receive up to ``expect`` messages, parsing each as the fork's thread would."""
        got: list[Parsed] = []
        while len(got) < expect and self.died is None and self.pull.poll(timeout_ms):
            frames = self.pull.recv_multipart()
            try:
                got.append(self._parse(frames))
            except Exception as error:  # the fork's thread has no handler: it would be gone now
                self.died = f"{type(error).__name__}: {error} on {frames!r}"
        self.received += got
        return got

    def _parse(self, msg: list[bytes]) -> Parsed:
        room, session = msg[0].decode("ascii"), msg[3].decode("ascii")
        if room == "None":
            pointers = list(struct.unpack(f"{len(msg[4]) // 8}Q", msg[4]))
            endpoint, port = msg[1].decode("ascii"), int(msg[2].decode("ascii"))
            self.failed_sessions.discard(session)
            return Parsed("registration", None, session, {"endpoint": endpoint, "port": port, "pointers": pointers})
        number = int(room)
        text = msg[4].decode("ascii")
        fields: dict[str, Any] = {
            "endpoint": msg[1].decode("ascii"),
            "port": int(msg[2].decode("ascii")),
            "blocks": [int(x) for x in text.split(",")] if text else [],
            "required_dst_info_num": int(msg[5].decode("ascii")),
        }
        if len(msg) >= 8:
            fields |= {"sent_tokens": int(msg[6].decode("ascii")), "allocated_tokens": int(msg[7].decode("ascii"))}
            return Parsed("resume", number, session, fields)
        fields["allocated_tokens"] = int(msg[6].decode("ascii"))
        return Parsed("init", number, session, fields)

    def fail(self, parsed: Parsed) -> None:
        """The write for ``parsed`` was refused: its session is marked failed and Failed reported."""
        self.failed_sessions.add(parsed.session)
        self.report(parsed, 0)

    def report(self, parsed: Parsed, status: int) -> None:
        """Send ``[room, status]`` to the ip and port the init or resume named: Failed, whatever ``status``
        says, for a session marked failed (its worker writes nothing for it)."""
        if parsed.session in self.failed_sessions:
            status = 0
        endpoint = f"tcp://{parsed.fields['endpoint']}:{parsed.fields['port']}"
        if endpoint not in self.pushes:
            self.pushes[endpoint] = self.context.socket(zmq.PUSH)
            self.pushes[endpoint].setsockopt(zmq.LINGER, 0)
            self.pushes[endpoint].connect(endpoint)
        self.pushes[endpoint].send_multipart([str(parsed.room).encode("ascii"), str(status).encode("ascii")])

    def close(self) -> None:
        for socket in [self.pull, *self.pushes.values()]:
            socket.close(linger=0)


class ForkLanguage:
    """The fork's Language-side manager of one rank (tp 1, dp 1), seen from the wire."""

    def __init__(self, bootstrap: str, session: str, pointers: list[int], block_size: int) -> None:
        self.context = zmq.Context.instance()
        self.pull = self.context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.ip = "127.0.0.1"
        self.port = self.pull.bind_to_random_port(f"tcp://{self.ip}")
        self.session, self.block_size = session, block_size
        self.status: dict[int, int] = {}
        self.messages: list[list[bytes]] = []
        self.died: str | None = None
        self.failure: str | None = None  # the fork's record when bootstrapping failed
        self.push: zmq.Socket[bytes] | None = None
        try:
            sizes = _get(f"http://{bootstrap}/route?engine_rank=-1&target_dp_group=-1")
            tp_size, dp_size = int(sizes["embedding_tp_size"]), int(sizes["embedding_dp_size"])
        except Exception:
            self.failure = f"Could not fetch embedding parallel info from bootstrap_addr: {bootstrap}"
            return
        assert (tp_size, dp_size) == (1, 1)
        self.required = 1  # conn:991-998: a single Language rank never outnumbers the Encode side's ranks
        try:
            info = _get(f"http://{bootstrap}/route?engine_rank=0&target_dp_group=0")
        except Exception:
            self.failure = "Could not fetch bootstrap info for engine rank: 0 and target_dp_group: 0"
            return
        self.push = self.context.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(f"tcp://{info['rank_ip']}:{info['rank_port']}")
        packed = b"".join(struct.pack("Q", pointer) for pointer in pointers)
        self._send(["None", self.ip, str(self.port), session, packed])

    def _send(self, frames: list[str | bytes]) -> None:
        assert self.push is not None, "bootstrapping failed: the fork has no rank to send to"
        self.push.send_multipart([f if isinstance(f, bytes) else f.encode("ascii") for f in frames])

    def init(self, room: int, blocks: list[int], allocated: int | None = None) -> None:
        allocated = len(blocks) * self.block_size if allocated is None else allocated
        head = [str(room), self.ip, str(self.port), self.session, ",".join(map(str, blocks))]
        self._send([*head, str(self.required), str(allocated)])

    def resume(self, room: int, blocks: list[int], sent: int) -> None:
        head = [str(room), self.ip, str(self.port), self.session, ",".join(map(str, blocks))]
        self._send([*head, str(self.required), str(sent), str(len(blocks) * self.block_size)])

    def wait_for(self, room: int, wanted: set[int], timeout_ms: int = 10_000) -> int:
        """Listen as the fork's Language thread does until ``room`` reaches one of ``wanted``."""
        while self.died is None and self.status.get(room) not in wanted and self.pull.poll(timeout_ms):
            frames = self.pull.recv_multipart()
            self.messages.append(frames)
            try:
                (number, status) = frames
                self._update(int(number.decode("ascii")), int(status.decode("ascii")))
            except Exception as error:  # the fork's Language thread would be gone now
                self.died = f"{type(error).__name__}: {error} on {frames!r}"
        return self.status.get(room, -1)

    def _update(self, room: int, status: int) -> None:
        if room not in self.status or status == 0:
            self.status[room] = status
        else:
            self.status[room] = max(self.status[room], status)

    def close(self) -> None:
        self.pull.close(linger=0)
        if self.push is not None:
            self.push.close(linger=0)
