"""Pure figure builders: data in, plotly figure out. No I/O, no Dash state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")


def _base_layout(title: str, y_title: str, *, log_y: bool = False) -> dict[str, Any]:
    return {
        "title": {"text": title, "x": 0.01, "font": {"size": 14}},
        "margin": {"l": 55, "r": 15, "t": 35, "b": 40},
        "xaxis": {"title": {"text": "step"}, "showgrid": True},
        "yaxis": {"title": {"text": y_title}, "type": "log" if log_y else "linear"},
        "legend": {"orientation": "h", "y": -0.25},
        "uirevision": "keep",
        "template": "plotly_white",
        "height": 320,
    }


def series_figure(
    title: str,
    names: Sequence[str],
    series: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    *,
    y_title: str = "value",
    log_y: bool = False,
) -> go.Figure:
    """Line chart with one trace per name (in the given order, so extendData indices are
    stable); traces with no data yet are drawn empty."""
    fig = go.Figure(layout=_base_layout(title, y_title, log_y=log_y))
    for i, name in enumerate(names):
        data = (series or {}).get(name, {})
        fig.add_trace(
            go.Scattergl(
                x=list(data.get("step", [])),
                y=list(data.get("value", [])),
                mode="lines",
                name=name,
                line={"color": PALETTE[i % len(PALETTE)], "width": 1.5},
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
