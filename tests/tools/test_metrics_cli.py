"""``simulate --metrics-port`` serves /metrics over HTTP while it runs; ``--metrics-out`` writes the final text.

The scrape happens from inside the run, right after the workload ends and before the command returns,
through a wrapper around the simulation the command calls: the server is up exactly as long as the run.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.command_line import run_cli

from epd_receiver.adapters.tools import cli

P = "sglang:epd_receive_"
RUN = ("simulate", "--requests", "40", "--hidden-size", "64", "--fail-rate", "0.2", "--abort-rate", "0.2")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def values(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample by family and sorted labels."""
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def check(text: str, summary: dict[str, Any]) -> None:
    seen = values(text)
    assert all("room" not in dict(labels) for samples in seen.values() for labels in samples)
    ended = seen[P + "requests_total"]
    assert sum(ended.values()) == summary["requests"] == 40
    assert ended.get((("outcome", "success"),), 0) == summary["succeeded"]
    assert ended.get((("outcome", "failed"),), 0) == summary["failed"] > 0
    assert sum(seen[P + "failed_reqs_total"].values()) == summary["failed"]
    assert seen[P + "resumes_total"][()] == summary["resume_rounds"]
    assert seen[P + "stage_seconds_count"][(("stage", "receive"),)] == 40
    assert seen[P + "tokens_total"][()] >= summary["tokens"] > 0
    blocks = seen[P + "pool_blocks"]
    assert sum(blocks.values()) == summary["config"]["num_blocks"]
    assert all(value >= 0 for samples in seen.values() for value in samples.values())


def test_simulate_serves_metrics_over_http_while_it_runs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    scraped: list[tuple[str, dict[str, Any]]] = []
    real = cli.simulate

    def simulate_then_scrape(*args: Any, **kwargs: Any) -> dict[str, Any]:
        summary = real(*args, **kwargs)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            scraped.append((response.read().decode(), summary))
        return summary

    monkeypatch.setattr(cli, "simulate", simulate_then_scrape)
    code, _, _ = run_cli(capsys, *RUN, "--no-progress", "--json", "--metrics-port", str(port))
    assert code == 0
    [(text, summary)] = scraped
    check(text, summary)


def test_simulate_writes_the_final_exposition(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "metrics.txt"
    code, stdout, _ = run_cli(capsys, *RUN, "--json", "--metrics-out", str(out))
    assert code == 0

    check(out.read_text(), json.loads(stdout))


def test_metrics_need_the_in_process_transport(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["simulate", "--transport", "mooncake", "--metrics-out", "x"])
    assert exit_.value.code == 2
    assert "--metrics-port and --metrics-out need --transport inprocess" in capsys.readouterr().err
