"""Line charts as small self-contained SVG (no plotting library), for reports and artifacts.

Each series is one `<polyline>` per unbroken run of values, so a chart of thousands of points stays
a few tens of kilobytes and renders at once in a browser or Prefect's UI.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from typing import TypeGuard

PALETTE = ("steelblue", "darkorange", "seagreen", "crimson", "mediumpurple", "saddlebrown")


def _finite(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _step(span: float, count: int) -> float:
    """The round step (1, 2, 2.5 or 5 times a power of ten) giving closest to `count` ticks."""
    power = 10 ** math.floor(math.log10(span / count))
    steps = [m * power for m in (1, 2, 2.5, 5, 10, 20)]
    return min(steps, key=lambda step: abs(math.floor(span / step) + 1 - count))


def _ticks(low: float, high: float, count: int = 5, whole: bool = False) -> list[float]:
    step = _step(high - low, count)
    if whole:
        step = max(1, round(step))
    first = math.ceil(low / step - 1e-9)
    ticks = [(first + i) * step for i in range(int((high - low) / step) + 2)]
    return [0.0 if abs(t) < step * 1e-9 else t for t in ticks if t <= high + step * 1e-9]


def _fmt(value: float) -> str:
    """Compact tick labels: 0.25, 1200, 3.5e+06, 2.5e-05."""
    if value == 0:
        return "0"
    return f"{value:.6g}" if 1e-3 <= abs(value) < 1e6 else f"{value:.3g}"


def _y_range(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    margin = (high - low) * 0.05 if high > low else (abs(low) * 0.1 or 1.0)
    return low - margin, high + margin


def line_chart_svg(series: dict[str, list[float | None]], *, marks: Sequence[tuple[int, str]] = (),
                   x_label: str = "generation", title: str | None = None,
                   width: int = 640, height: int = 280) -> str | None:
    """Series of values at x = 1, 2, 3... (None or non-finite: a gap) on one y axis, with a legend
    and dashed vertical marks labelled as given; None when there is no finite value to draw."""
    finite = [v for values in series.values() for v in values if _finite(v)]
    if not finite:
        return None
    y_low, y_high = _y_range(finite)
    n = max(len(values) for values in series.values())
    x_low = min([1, *(m[0] for m in marks)])
    x_high = max([n, *(m[0] for m in marks)])
    if x_low == x_high:
        x_low, x_high = x_low - 1, x_high + 1
    left, right, bottom = 60, 20, 45
    top = 50 if title else 32
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(value: float) -> float:
        return left + plot_w * (value - x_low) / (x_high - x_low)

    def y(value: float) -> float:
        return top + plot_h * (1 - (value - y_low) / (y_high - y_low))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    if title:
        out.append(f'<text x="{left}" y="18" font-size="13">{html.escape(title)}</text>')
    legend_x, legend_y = left, top - 14
    for i, name in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        out.append(f'<line x1="{legend_x}" y1="{legend_y - 4}" x2="{legend_x + 18}" y2="{legend_y - 4}" '
                   f'stroke="{colour}" stroke-width="2"/><text x="{legend_x + 22}" y="{legend_y}">'
                   f'{html.escape(name)}</text>')
        legend_x += 40 + 6 * len(name)
    bottom_y = top + plot_h
    out += [f'<line x1="{left}" y1="{bottom_y}" x2="{left + plot_w}" y2="{bottom_y}" stroke="black"/>',
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom_y}" stroke="black"/>']
    for tick in _ticks(x_low, x_high, whole=True):
        out.append(f'<text x="{x(tick):.1f}" y="{bottom_y + 15}" text-anchor="middle">{_fmt(tick)}</text>')
    for tick in _ticks(y_low, y_high):
        out.append(f'<line x1="{left - 4}" y1="{y(tick):.1f}" x2="{left + plot_w}" y2="{y(tick):.1f}" '
                   f'stroke="#ddd"/><text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">'
                   f'{_fmt(tick)}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 12}" text-anchor="middle">'
               f'{html.escape(x_label)}</text>')
    for i, (at, label) in enumerate(marks):
        mx = x(at)
        anchor = 'text-anchor="end" ' if mx + 6 * len(label) > width else ""  # keep it inside
        out.append(f'<line x1="{mx:.1f}" y1="{top}" x2="{mx:.1f}" y2="{bottom_y}" stroke="gray" '
                   f'stroke-dasharray="4,3"/><text x="{mx + (-3 if anchor else 3):.1f}" '
                   f'y="{top + 11 + 12 * (i % 3)}" {anchor}fill="dimgray" font-size="10">'
                   f'{html.escape(label)}</text>')
    for i, values in enumerate(series.values()):
        colour = PALETTE[i % len(PALETTE)]
        for run in _runs(values):
            points = _points([(x(at), y(v)) for at, v in run])
            if len(points) == 1:
                cx, cy = points[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{colour}"/>')
            else:
                out.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="{colour}" '
                           f'stroke-width="1.5"/>')
    out.append("</svg>")
    return "\n".join(out)


def _runs(values: list[float | None]) -> list[list[tuple[int, float]]]:
    """The unbroken stretches of finite values, as (x, value) pairs with x counted from 1."""
    runs: list[list[tuple[int, float]]] = [[]]
    for at, value in enumerate(values, start=1):
        if _finite(value):
            runs[-1].append((at, float(value)))
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if run]


def _points(coordinates: list[tuple[float, float]]) -> list[str]:
    """Coordinates to one decimal, dropping repeats that would draw nothing."""
    points: list[str] = []
    for cx, cy in coordinates:
        point = f"{cx:.1f},{cy:.1f}"
        if not points or point != points[-1]:
            points.append(point)
    return points


def data_uri(svg: str) -> str:
    """The SVG as a `data:` URI, to embed in markdown or HTML."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
