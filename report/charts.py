"""Histograms as inline SVG: no JavaScript, no fonts or files to fetch, one string per chart.

`histogram_svg` draws one or more series as stacked bars over shared bins, with axis ticks, a
legend when there is more than one series, and a native tooltip (`<title>`) on every bar.
`describe` gives the numbers printed under a chart and returned by `inspect_output`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from statistics import median
from typing import Mapping, Optional, Sequence

# Series colours (colour-blind-safe pair first), in series order.
COLOURS = ("#3b6fb6", "#e08a1e", "#5a9e52", "#b0457a")

_WIDTH, _HEIGHT = 380, 200
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 10, 24, 34
_MAX_INT_BINS = 40
_FLOAT_BINS = 20


MAX_DECIMALS = 4  # past this, a float axis is labelled as offsets from a round base


@dataclass(frozen=True)
class Bins:
    """Bin edges: bin i holds values in [edges[i], edges[i+1]) (the last bin is closed)."""

    edges: tuple[float, ...]
    integer: bool

    def index(self, value: float) -> int:
        last = len(self.edges) - 2
        if value >= self.edges[-1]:
            return last
        lo, hi = 0, last
        while lo < hi:  # the last edge <= value
            mid = (lo + hi + 1) // 2
            if self.edges[mid] <= value:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def label(self, i: int) -> str:
        a, b = self.edges[i], self.edges[i + 1]
        if self.integer:
            a_int, b_int = int(a), int(b) - 1
            return f"{a_int}" if a_int == b_int else f"{a_int}–{b_int}"
        return f"{self.fmt(a)}–{self.fmt(b)}"

    def _decimals(self) -> int:
        step = (self.edges[-1] - self.edges[0]) / (len(self.edges) - 1)
        return min(12, max(0, -math.floor(math.log10(step))) + 1) if step > 0 else 6

    def base(self) -> Optional[float]:
        """For a range too narrow to label plainly (unit-norm embeddings: 0.99999994 to
        1.00000005), the round value the ticks are offsets from; else None."""
        if self.integer or self._decimals() <= MAX_DECIMALS:
            return None
        middle = (self.edges[0] + self.edges[-1]) / 2
        return round(middle, MAX_DECIMALS)

    def fmt(self, value: float) -> str:
        """`value` with just enough decimals to tell neighbouring edges apart; in a narrow range
        (see `base`) its offset from the base in two significant digits, e.g. `+5.2e-08`."""
        if self.integer:
            return str(int(value))
        base = self.base()
        if base is not None:
            return "0" if value == base else f"{value - base:+.2g}"
        text = f"{value:.{self._decimals()}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text


def make_bins(values: Sequence[float], *, integer: bool, value_range: Optional[tuple[float, float]] = None) -> Bins:
    """Bins covering `values` (or `value_range`): one per integer for small integer ranges,
    otherwise about 20-40 equal bins. A degenerate range gets a single narrow bin."""
    lo, hi = value_range if value_range is not None else (min(values, default=0), max(values, default=0))
    if integer:
        lo, hi = math.floor(lo), math.floor(hi)
        span = hi - lo + 1
        step = 1 if span <= _MAX_INT_BINS else math.ceil(span / (_MAX_INT_BINS // 2))
        count = math.ceil(span / step)
        return Bins(tuple(float(lo + i * step) for i in range(count + 1)), integer=True)
    if hi - lo <= 1e-12 * max(1.0, abs(lo)):
        pad = max(abs(lo) * 1e-6, 1e-9)
        return Bins((lo - pad, hi + pad), integer=False)
    step = (hi - lo) / _FLOAT_BINS
    return Bins(tuple(lo + i * step for i in range(_FLOAT_BINS)) + (hi,), integer=False)


def describe(values: Sequence[float]) -> dict[str, Optional[float]]:
    """count, min, median, mean, max (None when empty)."""
    if not values:
        return {"count": 0, "min": None, "median": None, "mean": None, "max": None}
    return {
        "count": len(values),
        "min": min(values),
        "median": median(values),
        "mean": sum(values) / len(values),
        "max": max(values),
    }


def histogram_svg(
    title: str,
    series: Mapping[str, Sequence[float]],
    *,
    integer: bool,
    x_label: str,
    value_range: Optional[tuple[float, float]] = None,
    chart_id: str = "",
) -> str:
    """An inline <svg> histogram of `series` (name -> values), stacked in series order."""
    every = [v for values in series.values() for v in values]
    head = (
        f'<svg class="chart" role="img" viewBox="0 0 {_WIDTH} {_HEIGHT}" width="{_WIDTH}" height="{_HEIGHT}"'
        + (f' id="{escape(chart_id, quote=True)}"' if chart_id else "")
        + f' aria-label="{escape(title, quote=True)}">'
    )
    parts = [head, f'<text class="chart-title" x="{_LEFT}" y="15">{escape(title)}</text>']
    if not every:
        parts.append(f'<text class="chart-empty" x="{_WIDTH / 2}" y="{_HEIGHT / 2}" text-anchor="middle">no data</text>')
        parts.append("</svg>")
        return "".join(parts)

    bins = make_bins(every, integer=integer, value_range=value_range)
    nbins = len(bins.edges) - 1
    counts = {name: [0] * nbins for name in series}
    for name, values in series.items():
        for v in values:
            counts[name][bins.index(v)] += 1
    totals = [sum(counts[name][i] for name in series) for i in range(nbins)]
    top = _nice_ceiling(max(totals))

    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM
    base_y = _TOP + plot_h
    bar_w = plot_w / nbins

    # y axis: 0, top/2, top
    for frac in (0.0, 0.5, 1.0):
        y = base_y - frac * plot_h
        value = top * frac
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{_LEFT - 4}" y="{y + 3:.1f}" text-anchor="end">{_fmt_count(value)}</text>')

    for i in range(nbins):
        y = base_y
        x = _LEFT + i * bar_w
        for s, name in enumerate(series):
            n = counts[name][i]
            if not n:
                continue
            h = n / top * plot_h
            y -= h
            colour = COLOURS[s % len(COLOURS)]
            tip = f"{bins.label(i)}: {n}" + (f" {name}" if len(series) > 1 else "")
            parts.append(
                f'<rect x="{x + 0.5:.1f}" y="{y:.1f}" width="{max(bar_w - 1, 0.5):.1f}" height="{h:.1f}" '
                f'fill="{colour}"><title>{escape(tip)}</title></rect>'
            )

    # x axis: integer bins are labelled at their centres (first value of the bin), float bins
    # at their edges; first, middle and last only.
    parts.append(f'<line class="axis" x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{base_y}" y2="{base_y}"/>')
    if bins.integer:
        ticks = [
            (_LEFT + (j + 0.5) * bar_w, str(int(bins.edges[j])), "middle") for j in sorted({0, nbins // 2, nbins - 1})
        ]
    else:  # the end labels lean inwards so long ones (norms) stay inside the chart
        anchors = {0: "start", nbins: "end"}
        ticks = [
            (_LEFT + j * bar_w, bins.fmt(bins.edges[j]), anchors.get(j, "middle")) for j in sorted({0, nbins // 2, nbins})
        ]
    for x, text, anchor in ticks:
        parts.append(f'<text class="tick" x="{x:.1f}" y="{base_y + 13}" text-anchor="{anchor}">{escape(text)}</text>')
    base = bins.base()
    if base is not None:
        x_label = f"{x_label} − {base:g}"  # the ticks are offsets from the base
    parts.append(
        f'<text class="axis-label" x="{_LEFT + plot_w / 2:.1f}" y="{_HEIGHT - 4}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
    )
    if len(series) > 1:
        x = _WIDTH - _RIGHT
        for s, name in reversed(list(enumerate(series))):
            label = f"{name} ({len(series[name])})"
            parts.append(f'<text class="legend" x="{x - 12}" y="15" text-anchor="end">{escape(label)}</text>')
            parts.append(f'<rect x="{x - 10}" y="7" width="9" height="9" fill="{COLOURS[s % len(COLOURS)]}"/>')
            x -= 22 + 6.2 * len(label)
    parts.append("</svg>")
    return "".join(parts)


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 5 x 10^k that is >= value (and >= 1)."""
    if value <= 1:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for m in (1, 2, 5, 10):
        if m * exp >= value:
            return float(m * exp)
    return float(10 * exp)


def _fmt_count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"



def share_bars_svg(title: str, rows: Sequence[tuple[str, Optional[float], int, int]], *, chart_id: str = "",
                   reference: float = 0.5, reference_label: str = "balanced") -> str:
    """Horizontal bars, one per row (label, share in [0, 1] or None, samples, series index for
    the colour), on a 0-100% axis, with a dashed line at `reference` (a balanced mix)."""
    label_w, bar_w, row_h = 150, 190, 18
    width = label_w + bar_w + 90
    height = 30 + row_h * max(len(rows), 1) + 22
    parts = [
        f'<svg class="chart bias-chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}"'
        + (f' id="{escape(chart_id, quote=True)}"' if chart_id else "")
        + f' aria-label="{escape(title, quote=True)}">',
        f'<text class="chart-title" x="4" y="15">{escape(title)}</text>',
    ]
    for i, (label, share, n, series) in enumerate(rows):
        y = 26 + i * row_h
        parts.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end" font-size="11">{escape(label)}</text>')
        if share is None:
            parts.append(f'<text x="{label_w + 4}" y="{y + 12}" font-size="11">no samples</text>')
            continue
        w = round(bar_w * share, 1)
        parts.append(f'<rect x="{label_w}" y="{y + 2}" width="{w}" height="{row_h - 5}" fill="{COLOURS[series % len(COLOURS)]}">'
                     f"<title>{escape(label)}: {share:.1%} of {n} samples</title></rect>")
        parts.append(f'<text x="{label_w + bar_w + 6}" y="{y + 12}" font-size="11">{share:.0%} of {n}</text>')
    x_ref = label_w + bar_w * reference
    bottom = 26 + row_h * max(len(rows), 1)
    parts.append(f'<line x1="{x_ref}" y1="22" x2="{x_ref}" y2="{bottom}" stroke="#444" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{x_ref}" y="{bottom + 14}" text-anchor="middle" font-size="10">{escape(reference_label)} '
                 f"({reference:.0%})</text>")
    parts.append("</svg>")
    return "".join(parts)
