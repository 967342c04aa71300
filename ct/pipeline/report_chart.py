"""The report's charts, inline SVG, standard library only: "Accuracy over commits" (a line per
judged run) and "Per class" (grouped bars: each model's test accuracy on each class).

Every shape carries its colours as SVG presentation attributes (fill, stroke, ...), never through
CSS: Jenkins serves the page under a Content-Security-Policy that may block its style sheet, and
an SVG shape whose fill nobody set is filled black, which turned the whole chart into one block.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

FONT = 'font-family="system-ui, sans-serif" font-size="11"'
LABEL_COLOUR = "#555"
PLOT_FILL, PLOT_EDGE, GRID_COLOUR = "#fff", "#bbb", "#eee"
ACCURACY_COLOUR = "#1f6feb"
THRESHOLD_COLOUR = "#d1242f"
PASS_COLOUR, FAIL_COLOUR = "#1a7f37", "#d1242f"
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 900, 280, 48, 16, 16, 56
MAX_LABELS = 12  # commit labels under the x axis; more would overlap
BAR_GAP = 0.2  # share of a class's slot left free between groups of bars


@dataclass(frozen=True)
class Point:
    """One judged run: its test accuracy, the threshold it was judged by, the verdict."""

    accuracy: float
    threshold: float | None
    passed: bool
    label: str  # under the x axis (a short commit id)
    tip: str  # the tooltip


@dataclass(frozen=True)
class Axes:
    """Maps a point's index and a percentage to the chart's coordinates."""

    count: int
    low: float
    high: float = 100.0

    @property
    def slot(self) -> float:
        return (WIDTH - LEFT - RIGHT) / self.count if self.count else 0.0

    def x(self, i: int) -> float:
        return LEFT + self.slot * (i + 0.5)

    def y(self, value: float) -> float:
        return TOP + (HEIGHT - TOP - BOTTOM) * (self.high - value) / (self.high - self.low)


def history_chart(points: Sequence[Point]) -> str:
    """Accuracy per judged run (x: in order, labelled by commit) and the threshold, as SVG."""
    values = [p.accuracy for p in points] + [p.threshold for p in points if p.threshold is not None]
    axes, parts = frame("accuracy-chart", "Test accuracy per judged run, with the threshold",
                        len(points), values)
    if points:
        parts += marks(points, axes)
    else:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" class="empty" '
                     f'fill="{LABEL_COLOUR}" text-anchor="middle" font-size="14">no gate results '
                     "yet</text>")
    parts.append("</svg>")
    return "".join(parts)


def frame(chart_id: str, title: str, count: int, values: Sequence[float]
          ) -> tuple[Axes, list[str]]:
    """A chart's axes (`count` slots, from a round 10 at least 5 points under the lowest value
    up to 100%) and its opening: the svg element, its title, the plot area and the grid."""
    low = max(0.0, math.floor((min(values) - 5) / 10) * 10) if values else 0.0
    axes = Axes(count, low)
    return axes, [f'<svg id="{chart_id}" xmlns="http://www.w3.org/2000/svg" role="img" '
                  f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" {FONT}>',
                  f"<title>{title}</title>",
                  f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
                  f'height="{HEIGHT - TOP - BOTTOM}" class="plot" fill="{PLOT_FILL}" '
                  f'stroke="{PLOT_EDGE}"/>', *grid(axes)]


def grid(axes: Axes) -> list[str]:
    """Horizontal lines with their percentages, every 10 points (5 on a narrow range)."""
    step = 10 if axes.high - axes.low > 30 else 5
    parts, tick = [], axes.high
    while tick >= axes.low:
        y = axes.y(tick)
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'class="grid" stroke="{GRID_COLOUR}"/><text x="{LEFT - 6}" '
                     f'y="{y + 4:.1f}" class="ylab" fill="{LABEL_COLOUR}" text-anchor="end">'
                     f"{tick:g}</text>")
        tick -= step
    return parts


def marks(points: Sequence[Point], axes: Axes) -> list[str]:
    """The threshold steps, the accuracy line, a dot per run (with its tooltip), commit labels."""
    x: Callable[[int], float] = axes.x
    parts = []
    steps = [(i, p.threshold) for i, p in enumerate(points) if p.threshold is not None]
    if steps:
        half = axes.slot / 2
        path = " ".join(f"{x(i) - half:.1f},{axes.y(t):.1f} {x(i) + half:.1f},{axes.y(t):.1f}"
                        for i, t in steps)
        parts.append(f'<polyline id="threshold-line" class="threshold" points="{path}" '
                     f'fill="none" stroke="{THRESHOLD_COLOUR}" stroke-width="2" '
                     f'stroke-dasharray="6 4"><title>threshold {steps[-1][1]:g}%</title>'
                     "</polyline>")
    line = " ".join(f"{x(i):.1f},{axes.y(p.accuracy):.1f}" for i, p in enumerate(points))
    parts.append(f'<polyline class="accuracy" points="{line}" fill="none" '
                 f'stroke="{ACCURACY_COLOUR}" stroke-width="2"/>')
    every = max(1, math.ceil(len(points) / MAX_LABELS))
    label_y = HEIGHT - BOTTOM + 16
    for i, p in enumerate(points):
        verdict, colour = ("pass", PASS_COLOUR) if p.passed else ("fail", FAIL_COLOUR)
        parts.append(f'<circle cx="{x(i):.1f}" cy="{axes.y(p.accuracy):.1f}" r="3.5" '
                     f'class="{verdict}" fill="{colour}"><title>{html.escape(p.tip)}</title>'
                     "</circle>")
        if i % every == 0 or i == len(points) - 1:
            parts.append(f'<text x="{x(i):.1f}" y="{label_y}" class="xlab" '
                         f'fill="{LABEL_COLOUR}" transform="rotate(30 {x(i):.1f} {label_y})">'
                         f"{html.escape(p.label)}</text>")
    return parts


@dataclass(frozen=True)
class Series:
    """One model's bars in the per-class chart."""

    name: str  # the legend's text and the tooltips'
    values: Mapping[str, float]  # class -> test accuracy, percent; a class left out has no bar
    kind: str  # the bars' class attribute ("best", "latest"), for tests and readers
    colour: str


def per_class_chart(classes: Sequence[str], series: Sequence[Series]) -> str:
    """Grouped bars: for each class (x, in label order) one bar per series (model), its height
    the model's test accuracy on the class, with a tooltip; a legend under the class names."""
    values = [v for s in series for v in s.values.values()]
    axes, parts = frame("per-class-chart", "Test accuracy per class, one bar per model",
                        len(classes), values)
    width = axes.slot * (1 - BAR_GAP) / max(1, len(series))
    base = axes.y(axes.low)
    for i, name in enumerate(classes):
        first = axes.x(i) - width * len(series) / 2
        for k, one in enumerate(series):
            if name not in one.values:
                continue
            top = axes.y(one.values[name])
            tip = f"{name}: {one.name} {one.values[name]:g}%"
            parts.append(f'<rect x="{first + k * width:.1f}" y="{top:.1f}" width="{width:.1f}" '
                         f'height="{base - top:.1f}" class="bar {one.kind}" '
                         f'fill="{one.colour}" stroke="{one.colour}">'
                         f"<title>{html.escape(tip)}</title></rect>")
        parts.append(f'<text x="{axes.x(i):.1f}" y="{HEIGHT - BOTTOM + 16}" class="xlab" '
                     f'fill="{LABEL_COLOUR}" text-anchor="middle">{html.escape(name)}</text>')
    for k, one in enumerate(series):  # the legend, under the class names
        x, y = LEFT + 220 * k, HEIGHT - 20
        parts.append(f'<rect x="{x}" y="{y}" width="10" height="10" class="key {one.kind}" '
                     f'fill="{one.colour}" stroke="{one.colour}"/><text x="{x + 14}" '
                     f'y="{y + 9}" class="key" fill="{LABEL_COLOUR}">'
                     f"{html.escape(one.name)}</text>")
    parts.append("</svg>")
    return "".join(parts)
