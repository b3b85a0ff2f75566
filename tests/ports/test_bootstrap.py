"""The bootstrap server and its clients, over real HTTP on loopback; and which Encode rank a Language rank targets."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from epd_receiver.adapters.ports.mooncake.bootstrap import (
    BootstrapServer,
    BootstrapUnavailable,
    Target,
    encode_parallel_info,
    encode_rank_endpoint,
    register_encode,
    target_of,
    wait_for_encode,
)


@pytest.fixture
def server() -> Iterator[BootstrapServer]:
    started = BootstrapServer()
    yield started
    started.close()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_an_encode_rank_registers_and_a_language_rank_finds_it(server: BootstrapServer) -> None:
    with pytest.raises(BootstrapUnavailable):
        encode_parallel_info(server.address)  # nothing registered: sizes are null, as in the fork
    register_encode(server.address, rank_ip="127.0.0.1", rank_port=5555, engine_rank=1, tp_size=2, dp_size=1)
    register_encode(server.address, rank_ip="127.0.0.1", rank_port=5556, engine_rank=0, tp_size=2, dp_size=1)
    assert wait_for_encode(server.address, 1.0) == (2, 1)
    assert encode_rank_endpoint(server.address, 1, 0) == "127.0.0.1:5555"
    assert encode_rank_endpoint(server.address, 0, 0) == "127.0.0.1:5556"
    with pytest.raises(BootstrapUnavailable):
        encode_rank_endpoint(server.address, 0, 3)


def test_the_routes_answer_as_the_fork_s_do(server: BootstrapServer) -> None:
    register_encode(server.address, rank_ip="10.1.2.3", rank_port=4000)
    base = f"http://{server.address}"
    assert get(f"{base}/health") == (200, "OK")
    status, body = get(f"{base}/route?engine_rank=-1&target_dp_group=-1")
    assert status == 200 and json.loads(body) == {"embedding_tp_size": 1, "embedding_dp_size": 1}
    status, body = get(f"{base}/route?engine_rank=0&target_dp_group=0")
    assert status == 200 and json.loads(body) == {"rank_ip": "10.1.2.3", "rank_port": 4000}
    assert get(f"{base}/route?engine_rank=0")[0] == 400
    assert get(f"{base}/route?engine_rank=5&target_dp_group=0")[0] == 404


def test_a_registration_missing_a_field_is_refused(server: BootstrapServer) -> None:
    request = urllib.request.Request(f"http://{server.address}/route", data=b'{"role": "Encode"}', method="PUT")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 400


def test_an_unreachable_server_is_reported_not_raised_raw() -> None:
    with pytest.raises(BootstrapUnavailable):
        wait_for_encode("127.0.0.1:1", 0.2)


@pytest.mark.parametrize(
    ("language_rank", "language_tp", "encode_tp", "expected"),
    [
        (0, 1, 1, Target(0, 0, 1)),
        (1, 2, 1, Target(0, 0, 2)),  # two Language ranks share the one Encode rank, which waits for both
        (1, 2, 2, Target(1, 0, 1)),
        (3, 4, 2, Target(1, 0, 2)),
    ],
)
def test_which_encode_rank_a_language_rank_targets(
    language_rank: int, language_tp: int, encode_tp: int, expected: Target
) -> None:
    target = target_of(
        6, language_rank=language_rank, language_tp=language_tp, language_dp=1, encode_tp=encode_tp, encode_dp=1
    )
    assert target == expected


def test_the_dp_group_follows_the_room() -> None:
    assert target_of(7, language_rank=0, language_tp=1, language_dp=1, encode_tp=1, encode_dp=3).dp_group == 1
