"""Plots of `qlm bench sim` as plain SVG files: SLO attainment against load (overall and per
class) and the TTFT distribution per load. Written by hand so the benchmark needs no plotting
library; any browser shows them."""

from __future__ import annotations

import html
import math
import pathlib

WIDTH, HEIGHT = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 150, 40, 60
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    step = (hi - lo) / 5 or 1.0
    return [lo + i * step for i in range(6)]


def line_chart(series: dict[str, list[tuple[float, float]]], *, title: str, xlabel: str,
               ylabel: str, log_x: bool = False, y_range=(0.0, 1.0),
               x_ticks: list[float] | None = None) -> str:
    """An SVG line chart, one line per series, with axes, ticks and a legend."""
    points = [p for pts in series.values() for p in pts]
    xs = [x for x, _ in points if not log_x or x > 0] or [1.0]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_hi = x_lo * 10 if log_x else x_lo + 1
    y_lo, y_hi = y_range
    fx = (lambda x: math.log10(max(x, x_lo))) if log_x else (lambda x: x)
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (fx(x) - fx(x_lo)) / (fx(x_hi) - fx(x_lo)) * w

    def py(y: float) -> float:
        return TOP + (1 - (y - y_lo) / (y_hi - y_lo)) * h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{LEFT}" y="22" font-size="14">{html.escape(title)}</text>',
           f'<line x1="{LEFT}" y1="{TOP + h}" x2="{LEFT + w}" y2="{TOP + h}" stroke="black"/>',
           f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + h}" stroke="black"/>']
    for t in x_ticks or _ticks(x_lo, x_hi, log_x):
        if x_lo <= t <= x_hi:
            out.append(f'<text x="{px(t):.1f}" y="{TOP + h + 16}" text-anchor="middle">'
                       f'{t:g}</text>')
    for t in _ticks(y_lo, y_hi, False):
        out.append(f'<text x="{LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.2g}</text>')
        out.append(f'<line x1="{LEFT}" y1="{py(t):.1f}" x2="{LEFT + w}" y2="{py(t):.1f}" '
                   f'stroke="#ddd"/>')
    out.append(f'<text x="{LEFT + w / 2}" y="{HEIGHT - 15}" text-anchor="middle">'
               f'{html.escape(xlabel)}</text>')
    out.append(f'<text x="18" y="{TOP + h / 2}" text-anchor="middle" '
               f'transform="rotate(-90 18 {TOP + h / 2})">{html.escape(ylabel)}</text>')
    for i, (label, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts if not log_x or x > 0)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        ly = TOP + 14 + 18 * i
        out.append(f'<line x1="{LEFT + w + 12}" y1="{ly - 4}" x2="{LEFT + w + 32}" '
                   f'y2="{ly - 4}" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{LEFT + w + 38}" y="{ly}">{html.escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def write_plots(runs: list[dict], folder: pathlib.Path) -> list[pathlib.Path]:
    """attainment-<class>.svg (and -all) against load, and ttft-cdf-<load>x.svg per load."""
    folder.mkdir(parents=True, exist_ok=True)
    scenario = runs[0]["scenario"] if runs else ""
    policies = list(dict.fromkeys(r["policy"] for r in runs))
    classes = sorted({c for r in runs for c in r["slo_attainment_by_class"]})
    written = []
    for cls in ["all", *classes]:
        series = {
            p: [(r["load"], r["slo_attainment"] if cls == "all"
                 else r["slo_attainment_by_class"].get(cls, 0.0))
                for r in runs if r["policy"] == p]
            for p in policies
        }
        path = folder / f"attainment-{cls}.svg"
        loads = sorted({r["load"] for r in runs})
        path.write_text(line_chart(series, title=f"{scenario}: SLO attainment ({cls})",
                                   xlabel="load (x trace rate)", ylabel="SLO attainment",
                                   log_x=min(loads) > 0, x_ticks=loads))
        written.append(path)
    for load in sorted({r["load"] for r in runs}):
        series = {}
        for r in runs:
            qs = r.get("ttft_quantiles_s") or []
            if r["load"] == load and qs:
                series[r["policy"]] = [(max(t, 1e-3), i / (len(qs) - 1))
                                       for i, t in enumerate(qs)]
        if series:
            path = folder / f"ttft-cdf-{load:g}x.svg"
            path.write_text(line_chart(series, title=f"{scenario} at {load:g}x: TTFT CDF",
                                       xlabel="time to first token (s)",
                                       ylabel="fraction of requests", log_x=True))
            written.append(path)
    return written
