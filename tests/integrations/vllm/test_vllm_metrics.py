"""The controller's metrics through vLLM's own stats path: the scheduler's ``get_ec_connector_stats``, vLLM's
``ECConnectorLogging`` (which rebuilds them with ``build_ec_connector_stats``) and ``ECConnectorProm`` (which
asks ``build_prom_metrics`` for the families and ``observe``s each step's data), into ``vllm:`` families."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.v1.request", reason="vLLM is not installed (make installs it)")

import prometheus_client
from support.vllm_engine import Engine, request, vllm_config
from support.vllm_links import FACTORY, sender_for
from vllm.distributed.ec_transfer.ec_connector.metrics import ECConnectorLogging, ECConnectorProm

B, H = 16, 32


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_receives_reach_vllms_log_line_and_its_prometheus_registry() -> None:
    config = vllm_config({"hidden_size": H, "num_blocks": 4, "block_size": B, "link_factory": FACTORY})
    eng = Engine(config)
    logging_ = ECConnectorLogging(config.ec_transfer_config)
    prom = ECConnectorProm(config, ["model_name", "engine"], {0: ["m", "0"]})
    before = sample("vllm:epd_receive_requests_total", {"outcome": "success"})
    resumes_before = sample("vllm:epd_receive_resumes_total")
    eng.add(request("r", [("m1", 100), ("m2", 30)]))
    receiver = eng.scheduler.receiver  # type: ignore[attr-defined]
    while eng.pending():
        sender = sender_for(receiver.buffers)
        for room in sender.rooms():
            sender.deliver(room)
        eng.step()
    for stats in eng.stats:  # what SchedulerStats carries to the front end, step by step
        logging_.observe(stats.data)
        prom.observe(stats.data, engine_idx=0)
    lines: list[str] = []
    logging_.log(log_fn=lambda fmt, text: lines.append(fmt % text))
    assert lines and "succeeded=2" in lines[0] and "failed=0" in lines[0]
    assert sample("vllm:epd_receive_requests_total", {"outcome": "success"}) == before + 2
    assert sample("vllm:epd_receive_resumes_total") > resumes_before  # 100 tokens through a pool of 64
    assert sample("vllm:epd_receive_pool_blocks", {"standing": "free"}) == 4
