"""Pure figure builders: data in, plotly figure out. No I/O, no Dash state.

Figures use transparent backgrounds and neutral grids so they read on the light and the
dark theme alike; ``uirevision`` keeps zoom and legend choices across live updates.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

PALETTE = (
    "#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2",
    "#ca8a04", "#db2777", "#4b5563", "#65a30d", "#7c3aed", "#0d9488",
)  # fmt: skip
GRID = "rgba(128,128,128,0.25)"
MARKER_TRACE = "events"


def _base_layout(
    title: str, y_title: str, *, log_y: bool = False, x_title: str = "step"
) -> dict[str, Any]:
    return {
        "title": {"text": title, "x": 0.01, "font": {"size": 14}},
        "margin": {"l": 60, "r": 20, "t": 35, "b": 40},
        "xaxis": {"title": {"text": x_title}, "gridcolor": GRID, "zeroline": False},
        "yaxis": {
            "title": {"text": y_title},
            "type": "log" if log_y else "linear",
            "gridcolor": GRID,
            "zeroline": False,
        },
        "legend": {"orientation": "h", "y": -0.25},
        "uirevision": "keep",
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "rgba(0,0,0,0)",
        "font": {"color": "#64748b"},
        "height": 320,
    }


def series_figure(
    title: str,
    names: Sequence[str],
    series: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    *,
    y_title: str = "value",
    log_y: bool = False,
    secondary: Sequence[str] = (),
    secondary_title: str = "",
    markers: bool = False,
) -> go.Figure:
    """Line chart with one trace per name, in the given order so that extendData indices
    are stable; names in ``secondary`` use a right-hand axis. With ``markers`` a last
    trace holds vertical event lines on a hidden 0–1 axis."""
    fig = go.Figure(layout=_base_layout(title, y_title, log_y=log_y))
    if secondary:
        fig.update_layout(
            yaxis2={
                "title": {"text": secondary_title},
                "overlaying": "y",
                "side": "right",
                "showgrid": False,
            }
        )
    # SVG lines, not WebGL (Scattergl): a trace holds at most max_points (1,000) points,
    # which SVG draws at once, while every WebGL plot creates a GL context, about half of
    # a 2-s page load on a machine without a GPU (bench/dashboard_load.py).
    for i, name in enumerate(names):
        data = (series or {}).get(name, {})
        fig.add_trace(
            go.Scatter(
                x=list(data.get("step", [])),
                y=list(data.get("value", [])),
                mode="lines",
                name=name,
                yaxis="y2" if name in secondary else "y",
                line={
                    "color": PALETTE[i % len(PALETTE)],
                    "width": 1.5,
                    "dash": "dot" if name in secondary else "solid",
                },
            )
        )
    if markers:
        fig.update_layout(yaxis3={"overlaying": "y", "range": [0, 1], "visible": False})
        fig.add_trace(
            go.Scatter(
                x=[],
                y=[],
                mode="lines",
                name=MARKER_TRACE,
                yaxis="y3",
                hoverinfo="text",
                text=[],
                line={"color": "#ea580c", "width": 1.5, "dash": "dash"},
            )
        )
    return fig


def extend_payload(
    names: Sequence[str], series: Mapping[str, Mapping[str, Sequence[Any]]]
) -> tuple[dict[str, list[list[Any]]], list[int]] | None:
    """The (data, trace indices) pair of Plotly's extendTraces for new points of the
    named traces; None when nothing is new."""
    xs: list[list[Any]] = []
    ys: list[list[Any]] = []
    idx: list[int] = []
    for i, name in enumerate(names):
        data = series.get(name)
        if data and data.get("step"):
            xs.append(list(data["step"]))
            ys.append(list(data["value"]))
            idx.append(i)
    if not idx:
        return None
    return {"x": xs, "y": ys}, idx


def marker_payload(
    events: Sequence[Mapping[str, Any]], trace_index: int
) -> tuple[dict[str, list[list[Any]]], list[int]] | None:
    """extendTraces data drawing one vertical line per onset/clear/alert event."""
    xs: list[Any] = []
    ys: list[Any] = []
    texts: list[Any] = []
    for ev in events:
        if ev["kind"] in ("memorization_onset", "memorization_cleared", "alert"):
            xs += [ev["step"], ev["step"], None]
            ys += [0, 1, None]
            texts += [ev["message"], ev["message"], None]
    if not xs:
        return None
    return {"x": [xs], "y": [ys], "text": [texts]}, [trace_index]


def heatmap_figure(layers: Sequence[str], title: str, z_title: str) -> go.Figure:
    """An empty layer × step heatmap: x = layer, y = step (rows are appended live)."""
    fig = go.Figure(layout=_base_layout(title, "step", x_title="layer"))
    fig.update_layout(height=420, xaxis={"showticklabels": len(layers) <= 24, "tickangle": -45})
    # One blank placeholder row: Plotly cannot size the image of an empty heatmap.
    names = list(layers) or ["…"]
    fig.add_trace(
        go.Heatmap(
            x=names,
            y=[-1],
            z=[[None] * len(names)],
            zmin=0,
            zmax=1,
            colorscale="Viridis",
            colorbar={"title": {"text": z_title}},
            hovertemplate="layer %{x}<br>step %{y}<br>" + z_title + " %{z:.3f}<extra></extra>",
        )
    )
    return fig


def heatmap_payload(
    steps: Sequence[int], rows: Sequence[Sequence[float | None]]
) -> tuple[dict[str, list[Any]], list[int]] | None:
    """extendTraces data appending rows (one per step) to the heatmap."""
    if not steps:
        return None
    return {"y": [list(steps)], "z": [[list(r) for r in rows]]}, [0]


def spectrum_trajectories(k: int) -> go.Figure:
    """Empty λ(W_s) top-k trajectories on a log axis, plus d_sig on the right axis."""
    names = [f"λ{i + 1}" for i in range(k)]
    fig = series_figure(
        "λ(W_s): top eigenvalues over training", [*names, "d_sig"], y_title="eigenvalue",
        log_y=True, secondary=("d_sig",), secondary_title="d_sig",
    )  # fmt: skip
    return fig


def spectrum_payload(
    entries: Sequence[Mapping[str, Any]], k: int
) -> tuple[dict[str, list[list[Any]]], list[int]] | None:
    """extendTraces data for the trajectories from new spectrum entries (trace k = d_sig)."""
    if not entries:
        return None
    xs: list[list[Any]] = [[] for _ in range(k + 1)]
    ys: list[list[Any]] = [[] for _ in range(k + 1)]
    for e in entries:
        eigs = e["w_eigs"]
        cutoff = 0.25 if e["method"] == "exact" else 1.0
        for i in range(k):
            if i < len(eigs) and eigs[i] is not None and eigs[i] > 0:
                xs[i].append(e["step"])
                ys[i].append(eigs[i])
        xs[k].append(e["step"])
        ys[k].append(sum(1 for v in eigs if v is not None and v > cutoff))
    return {"x": xs, "y": ys}, list(range(k + 1))


def spectrum_bars(entry: Mapping[str, Any] | None) -> go.Figure:
    """The latest spectrum as bars, with the signal-channel cutoff drawn."""
    fig = go.Figure(layout=_base_layout("latest λ(W_s)", "eigenvalue", x_title="index"))
    if entry is None:
        fig.add_annotation(text="no spectrum yet (watch with probe=...)", showarrow=False,
                           x=0.5, y=0.5, xref="paper", yref="paper")  # fmt: skip
        return fig
    eigs = [v or 0.0 for v in entry["w_eigs"]]
    cutoff = 0.25 if entry["method"] == "exact" else 1.0
    colours = ["#16a34a" if v > cutoff else "#94a3b8" for v in eigs]
    fig.add_trace(go.Bar(x=list(range(1, len(eigs) + 1)), y=eigs, marker_color=colours, name="λ"))
    fig.add_hline(y=cutoff, line_dash="dash", line_color="#dc2626",
                  annotation_text=f"cutoff {cutoff:g} ({entry['method']})")  # fmt: skip
    fig.update_layout(title={"text": f"latest λ(W_s) at step {entry['step']}"})
    return fig


def histogram_figure(entry: Mapping[str, Any] | None, layers: Sequence[str]) -> go.Figure:
    """Per-layer log10-SNR histograms at one step, as a layer × bin heatmap."""
    fig = go.Figure(layout=_base_layout("log₁₀ SNR per layer", "layer", x_title="log₁₀(ḡ²/ŝ)"))
    fig.update_layout(height=380, yaxis={"type": "category", "showticklabels": len(layers) <= 24})
    if entry is None:
        fig.add_annotation(text="no histograms yet", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")  # fmt: skip
        return fig
    edges = [e for e in entry["edges"] if e is not None]
    centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    counts = entry["counts"]
    norm = [[c / max(sum(row), 1) for c in row] for row in counts]
    # Layer names arrive with the run meta; until then rows are numbered.
    names = list(layers) if len(layers) == len(counts) else [f"#{i}" for i in range(len(counts))]
    fig.add_trace(
        go.Heatmap(
            x=centres,
            y=names,
            z=norm,
            colorscale="Blues",
            colorbar={"title": {"text": "share"}},
            hovertemplate="%{y}<br>log SNR %{x:.2f}<br>share %{z:.3f}<extra></extra>",
        )
    )
    fig.add_vline(x=0.0, line_dash="dash", line_color="#dc2626")
    fig.update_layout(title={"text": f"log₁₀ SNR per layer at step {entry['step']} (gate at 0)"})
    return fig


def compare_figure(
    title: str,
    runs: Sequence[tuple[str, Mapping[str, Sequence[Any]]]],
    *,
    x_title: str = "step",
    log_y: bool = False,
) -> go.Figure:
    """One trace per run of the same scalar; x is step or wall time."""
    fig = go.Figure(layout=_base_layout(title, title, log_y=log_y, x_title=x_title))
    fig.update_layout(height=460)
    for i, (label, data) in enumerate(runs):
        fig.add_trace(
            go.Scatter(
                x=list(data.get("x", [])),
                y=list(data.get("value", [])),
                mode="lines",
                name=label,
                line={"color": PALETTE[i % len(PALETTE)], "width": 1.5},
            )
        )
    if not runs:
        fig.add_annotation(text="choose runs and a series", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")  # fmt: skip
    return fig


def sparkline(values: Sequence[float | None]) -> go.Figure:
    """A tiny line without axes (runs table)."""
    ys = [v for v in values if v is not None and math.isfinite(v)]
    fig = go.Figure(go.Scatter(y=ys, mode="lines", line={"color": "#2563eb", "width": 1}))
    fig.update_layout(
        height=30, width=120, margin={"l": 0, "r": 0, "t": 0, "b": 0},
        xaxis={"visible": False}, yaxis={"visible": False, "range": [0, 1]},
        paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)", showlegend=False,
    )  # fmt: skip
    return fig
