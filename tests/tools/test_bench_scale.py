"""The bench's scale section and its picture, at tiny sizes: what they report and that the SVG is whole,
never how fast anything ran."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from epd_receiver.adapters.tools.bench_config import FULL, TINY
from epd_receiver.adapters.tools.bench_plot import scale_svg
from epd_receiver.adapters.tools.bench_scale import bytes_per_request, scale
from epd_receiver.adapters.tools.cli import main

SVG = "{http://www.w3.org/2000/svg}"
ROW_KEYS = {
    "in_flight",
    "quiet_ns_per_request",
    "baseline_ns_per_request",
    "quiet_vs_baseline",
    "add_us",
    "release_us",
    "state_change_us",
}


def test_the_full_bench_measures_at_1k_10k_and_50k_and_tiny_at_fractions() -> None:
    assert FULL.sizes == (1000, 10_000, 50_000) and FULL.memory_requests_resolved == 10_000
    assert TINY.sizes == (20, 200, 1000)
    assert dataclasses.replace(TINY, scale_sizes=(5, 7)).sizes == (5, 7)


def test_scale_reports_every_figure_at_every_size_and_the_worst_as_headlines() -> None:
    config = dataclasses.replace(TINY, scale_sizes=(10, 40), memory_requests=50)
    result = scale(config)
    rows = result["scale"]
    assert [row["in_flight"] for row in rows] == [10, 40] and all(row.keys() == ROW_KEYS for row in rows)
    assert result["add_us"] == max(row["add_us"] for row in rows)
    assert result["state_change_us"] == max(row["state_change_us"] for row in rows)
    assert result["scale_quiet_growth"] > 0 and result["bytes_per_request"] > 0


def test_a_request_keeps_a_few_hundred_bytes_not_kilobytes() -> None:
    # A behaviour, not a speed: nothing is bound per instance and the fields are slots.
    assert 0 < bytes_per_request(500) <= 4096


def test_the_plot_is_well_formed_svg_with_both_series(tmp_path: Path) -> None:
    rows = scale(dataclasses.replace(TINY, scale_sizes=(10, 20, 40), memory_requests=10))["scale"]
    root = ET.fromstring(scale_svg(rows))
    assert root.tag == f"{SVG}svg"
    lines = root.findall(f"{SVG}polyline")
    assert len(lines) == 2
    assert {line.findtext(f"{SVG}title") for line in lines} == {"epd-receiver", "hand-written loop"}
    assert all(len(line.get("points", "").split()) == 3 for line in lines)
    texts = {t.text for t in root.iter(f"{SVG}text")}
    assert {"10", "20", "40", "epd-receiver", "hand-written loop"} <= texts
    with pytest.raises(ValueError, match="no sizes"):
        scale_svg([])


def test_bench_plot_writes_the_picture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    picture = tmp_path / "scale.svg"
    tiny = ["--in-flight=5", "--poll-iterations=2", "--lifecycles=5", "--hidden-size=8", "--total-tokens=96"]
    tiny += ["--default-alloc=40", "--block-sizes", "4", "--repeats=1", "--fuzz-steps=5"]
    args = [*tiny, "--scale-sizes", "5", "10", "--memory-requests", "20", "--plot", str(picture)]
    assert main(["bench", *args]) == 0
    assert ET.parse(picture).getroot().tag == f"{SVG}svg"
    assert "as the work grows" in capsys.readouterr().out
