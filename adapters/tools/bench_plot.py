"""``epd-receiver bench --plot FILE``: the scale section as a picture, cost per request against requests in
flight, ours beside the hand-written loop. A flat line is the goal; a rising one is a scan somewhere.

Drawn by hand as SVG, so that the bench needs no plotting library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 160, 40, 60
SERIES = (
    ("quiet_ns_per_request", "epd-receiver", "#1f77b4"),
    ("baseline_ns_per_request", "hand-written loop", "#ff7f0e"),
)


def scale_svg(rows: Sequence[dict[str, Any]]) -> str:
    """One polyline per series over the sizes in ``rows`` (``bench_scale.scale``'s), x on a log scale."""
    if not rows:
        raise ValueError("no sizes to plot")
    sizes = [float(row["in_flight"]) for row in rows]
    top = max(float(row[key]) for row in rows for key, _, _ in SERIES) * 1.15 or 1.0
    low, high = math.log10(min(sizes)), math.log10(max(sizes))
    span = high - low or 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(size: float) -> float:
        return LEFT + (math.log10(size) - low) / span * plot_w

    def y(value: float) -> float:
        return TOP + plot_h - value / top * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        _text(LEFT, 24, "quiet scheduler iteration: cost per request in flight", size=14),
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}" stroke="black"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" stroke="black"/>',
    ]
    for size in sizes:
        parts.append(_text(x(size), TOP + plot_h + 18, f"{int(size):,}", anchor="middle"))
    parts.append(_text(LEFT + plot_w / 2, HEIGHT - 16, "requests in flight (log scale)", anchor="middle"))
    for i in range(5):
        value = top * i / 4
        parts.append(f'<line x1="{LEFT - 4}" y1="{y(value):.1f}" x2="{LEFT}" y2="{y(value):.1f}" stroke="black"/>')
        parts.append(_text(LEFT - 8, y(value) + 4, f"{value:.0f}", anchor="end"))
    parts.append(_text(18, TOP + plot_h / 2, "ns per request", anchor="middle", rotate=True))
    for index, (key, label, colour) in enumerate(SERIES):
        points = [(x(float(row["in_flight"])), y(float(row[key]))) for row in rows]
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"><title>{label}</title>')
        parts.append("</polyline>")
        parts += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>' for px, py in points]
        legend_y = TOP + 10 + 20 * index
        parts.append(
            f'<line x1="{WIDTH - RIGHT + 16}" y1="{legend_y}" x2="{WIDTH - RIGHT + 36}" y2="{legend_y}" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        parts.append(_text(WIDTH - RIGHT + 42, legend_y + 4, label))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_plot(path: Path, result: dict[str, Any]) -> None:
    path.write_text(scale_svg(result["scale"]), encoding="utf-8")


def _text(x: float, y: float, text: str, *, anchor: str = "start", size: int = 12, rotate: bool = False) -> str:
    turn = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if rotate else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}"{turn}>{escape(text)}</text>'
