"""The hand-written SVG line chart: well-formed, one polyline per unbroken run, marks and gaps drawn."""

from __future__ import annotations

import base64
import math
from xml.etree import ElementTree

import pytest

from lmflow.render.charts import data_uri, line_chart_svg

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str | None) -> ElementTree.Element:
    assert svg is not None
    return ElementTree.fromstring(svg)


def texts(root: ElementTree.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def test_one_polyline_per_series_with_legend_and_ticks() -> None:
    root = parse(line_chart_svg({"best": [9.0, 7.5, 4.0, 3.2], "mean": [12.0, 11.0, 9.5, 8.0],
                                 "diversity": [1.2, 0.9, 0.4, 0.3]}, title="GA <run> & coach"))
    polylines = list(root.iter(f"{SVG}polyline"))
    assert len(polylines) == 3
    assert len({p.get("stroke") for p in polylines}) == 3
    assert all(len(p.get("points", "").split()) == 4 for p in polylines)
    labels = texts(root)
    assert {"best", "mean", "diversity", "generation", "GA <run> & coach"} <= set(labels)
    numbers = [float(t) for t in labels if t.replace(".", "").replace("-", "").isdigit()]
    assert len(numbers) >= 6


def test_gaps_split_a_series_and_isolated_points_stay_visible() -> None:
    root = parse(line_chart_svg({"a": [1.0, 2.0, None, 3.0, math.nan, 4.0, 5.0, math.inf, 6.0]}))
    assert [len(p.get("points", "").split()) for p in root.iter(f"{SVG}polyline")] == [2, 2]
    assert len(list(root.iter(f"{SVG}circle"))) == 2


def test_marks_are_dashed_lines_with_their_labels() -> None:
    root = parse(line_chart_svg({"best": [5.0, 4.0, 3.0, 2.0, 1.0, 0.5]},
                                marks=[(2, "2: coach"), (5, "5: coach <fallback>")]))
    dashed = [line for line in root.iter(f"{SVG}line") if line.get("stroke-dasharray")]
    assert len(dashed) == 2
    assert float(dashed[0].get("x1", "")) < float(dashed[1].get("x1", ""))
    assert {"2: coach", "5: coach <fallback>"} <= set(texts(root))


@pytest.mark.parametrize("series", [{}, {"a": []}, {"a": [None, None], "b": [math.nan, math.inf]}])
def test_nothing_to_draw_is_none(series: dict) -> None:
    assert line_chart_svg(series) is None


def test_a_flat_series_gets_a_range() -> None:
    root = parse(line_chart_svg({"flat": [3.0] * 10}))
    ys = {float(point.split(",")[1]) for point in next(root.iter(f"{SVG}polyline")).get("points", "").split()}
    assert len(ys) == 1 and all(math.isfinite(y) for y in ys)


def test_thousands_of_points_stay_one_polyline_each() -> None:
    series = {f"s{i}": [math.sin(j / 50) * (i + 1) for j in range(5000)] for i in range(6)}
    svg = line_chart_svg(series)
    root = parse(svg)
    polylines = list(root.iter(f"{SVG}polyline"))
    assert len(polylines) == 6
    for polyline in polylines:
        for point in polyline.get("points", "").split():
            assert all(len(part.split(".")[1]) == 1 for part in point.split(","))
    assert data_uri(svg or "").startswith("data:image/svg+xml;base64,")
    assert base64.b64decode(data_uri(svg or "").split(",", 1)[1]).decode() == svg
