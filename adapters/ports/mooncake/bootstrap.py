"""The bootstrap rendezvous of the SGLang fork: where a Language rank finds the Encode rank it talks to.

The Encode side registers each of its ranks with ``PUT /route`` (JSON: role, tp_size, dp_size, rank_ip,
rank_port, engine_rank); a Language rank asks ``GET /route?engine_rank=-1&target_dp_group=-1`` for the
Encode side's tp and dp sizes, then ``GET /route?engine_rank=R&target_dp_group=G`` for one rank's
rank_ip and rank_port (ZhengWG/sglang at cca20b0, ``python/sglang/srt/disaggregation/mooncake/
conn_multimodal.py``: server ``:1233-1324``, Encode client ``:784-808``, Language client ``:1050-1084``,
which rank a Language rank targets and how many Language ranks an Encode rank waits for ``:991-1012``).

Ours is the standard library only: a threaded ``http.server`` and ``urllib``. It answers as the fork's
does, except that a rank nobody registered is a 404 (the fork intends that, but its lookup raises
first and the client sees a 500; a fork client treats both alike) and a PUT missing a field is a 400.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger(__name__)

_FIELDS = ("role", "tp_size", "dp_size", "rank_ip", "rank_port", "engine_rank")


class _Table:
    """The Encode ranks registered so far: tp and dp sizes of the first registration, then dp group -> tp rank."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tp_size: int | None = None
        self.dp_size: int | None = None
        self.ranks: dict[int, dict[int, dict[str, Any]]] = {}

    def put(self, data: dict[str, Any]) -> None:
        with self.lock:
            self.tp_size = int(data["tp_size"]) if self.tp_size is None else self.tp_size
            self.dp_size = int(data["dp_size"]) if self.dp_size is None else self.dp_size
            if data["role"] != "Encode":
                return
            engine_rank = int(data["engine_rank"])
            group = self.ranks.setdefault(engine_rank // self.tp_size, {})
            group[engine_rank % self.tp_size] = {"rank_ip": data["rank_ip"], "rank_port": int(data["rank_port"])}

    def get(self, engine_rank: int, dp_group: int) -> tuple[int, Any]:
        with self.lock:
            if engine_rank == -1 and dp_group == -1:
                return 200, {"embedding_tp_size": self.tp_size, "embedding_dp_size": self.dp_size}
            info = self.ranks.get(dp_group, {}).get(engine_rank)
        return (200, info) if info is not None else (404, "Bootstrap info not Found")


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("bootstrap: " + format, *args)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/health":
            return self._answer(200, "OK")
        if url.path != "/route":
            return self._answer(404, "Not Found")
        query = parse_qs(url.query)
        try:
            engine_rank, dp_group = int(query["engine_rank"][0]), int(query["target_dp_group"][0])
        except (KeyError, ValueError):
            return self._answer(400, "Missing inputs for bootstrap server.")
        self._answer(*self.server.table.get(engine_rank, dp_group))

    def do_PUT(self) -> None:
        if urlsplit(self.path).path != "/route":
            return self._answer(404, "Not Found")
        try:
            data = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            missing = [name for name in _FIELDS if name not in data]
            if missing:
                return self._answer(400, f"missing {missing}")
            self.server.table.put(data)
        except (ValueError, TypeError, ZeroDivisionError) as error:
            return self._answer(400, f"bad registration: {error}")
        self._answer(200, "OK")

    def _answer(self, status: int, body: Any) -> None:
        text = body if isinstance(body, str) else json.dumps(body)
        payload = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    table: _Table


class BootstrapServer:
    """The fork's bootstrap server, in a daemon thread of this process; ``address`` is its host:port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _Server((host, port), _Handler)
        self._server.table = _Table()
        self.address = f"{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="epd-bootstrap", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


# ---- clients ---------------------------------------------------------------------------------------


class BootstrapUnavailable(RuntimeError):
    """The bootstrap server did not answer, or does not know the Encode rank asked for."""


def _request(url: str, method: str = "GET", body: dict[str, Any] | None = None, timeout_s: float = 5.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError) as error:
        raise BootstrapUnavailable(f"{method} {url}: {error}") from error
    return json.loads(text) if text.startswith(("{", "null")) else text


def register_encode(
    address: str, *, rank_ip: str, rank_port: int, engine_rank: int = 0, tp_size: int = 1, dp_size: int = 1
) -> None:
    """Register one Encode rank, as the fork's Encode manager does once its PULL socket is bound."""
    body = {"role": "Encode", "tp_size": tp_size, "dp_size": dp_size, "rank_ip": rank_ip}
    _request(f"http://{address}/route", "PUT", body | {"rank_port": rank_port, "engine_rank": engine_rank})


def encode_parallel_info(address: str) -> tuple[int, int]:
    """The Encode side's (tp_size, dp_size); BootstrapUnavailable until some Encode rank registered."""
    info = _request(f"http://{address}/route?engine_rank=-1&target_dp_group=-1")
    if not isinstance(info, dict) or info.get("embedding_tp_size") is None or info.get("embedding_dp_size") is None:
        raise BootstrapUnavailable(f"no Encode rank registered at {address} yet: {info!r}")
    return int(info["embedding_tp_size"]), int(info["embedding_dp_size"])


def encode_rank_endpoint(address: str, engine_rank: int, dp_group: int) -> str:
    """``rank_ip:rank_port`` of one Encode rank: where a Language rank pushes its messages."""
    info = _request(f"http://{address}/route?engine_rank={engine_rank}&target_dp_group={dp_group}")
    if not isinstance(info, dict) or "rank_ip" not in info or "rank_port" not in info:
        raise BootstrapUnavailable(f"Encode rank {engine_rank} of dp group {dp_group} unknown at {address}")
    return f"{info['rank_ip']}:{int(info['rank_port'])}"


def wait_for_encode(address: str, timeout_s: float) -> tuple[int, int]:
    """``encode_parallel_info`` retried until an Encode rank has registered or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return encode_parallel_info(address)
        except BootstrapUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass(frozen=True, slots=True)
class Target:
    """Which Encode rank a Language rank talks to for a room, and how many Language ranks that rank waits for."""

    engine_rank: int
    dp_group: int
    required_dst_info_num: int


def target_of(
    room: int, *, language_rank: int, language_tp: int, language_dp: int, encode_tp: int, encode_dp: int
) -> Target:
    """The fork's mapping (``conn_multimodal.py:991-1012``): Language ranks beyond the Encode side's tp
    share one Encode rank, which then waits for all of them; the dp group follows the room."""
    local_tp = language_tp // language_dp
    if local_tp <= encode_tp:
        rank, required = language_rank % local_tp, 1
    else:
        rank, required = language_rank % encode_tp, local_tp // encode_tp
    return Target(rank, room % encode_dp, required)
