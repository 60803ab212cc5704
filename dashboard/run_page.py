"""The run page: status, live curves, channel occupancy, λ(W_s), memorization, events.

Every panel is fed by incremental reads (each API stream has its own cursor) and appended
with Plotly's extendTraces through ``extendData``; history is never re-sent. A finished
run stops polling once nothing new arrives.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import dash
from dash import ALL, Dash, Input, Output, State, dcc, html

from dashboard import figures
from dashboard.api_client import ApiClient, ApiError

K_TRAJ = 8
# Histograms kept for the slider (each one is layers × 24 counts in the browser).
HIST_POINTS = 200
# Steps kept in the layer × step heatmap: more rows than a panel has pixels only cost
# transfer and drawing time.
HEATMAP_ROWS = 400
# Events listed on the page (newest first); onset and alert markers stay on the charts.
EVENTS_SHOWN = 200


@dataclass(frozen=True)
class Panel:
    """A line-chart panel: its graph id, title, traces and one-sentence explanation."""

    graph: str
    title: str
    traces: tuple[str, ...]
    y_title: str
    explain: str
    empty: str
    log_y: bool = False
    secondary: tuple[str, ...] = ()
    secondary_title: str = ""
    markers: bool = False


PANELS = (
    Panel(
        "loss-graph", "training loss and estimated progress",
        ("train/loss", "memorization/train_progress", "memorization/population_progress"),
        "loss",
        "Training loss as logged (left) and the cumulative train and estimated population "
        "progress η·T and η·Q (right, dotted): when population progress flattens while train "
        "progress climbs, the run fits what will not transfer. Dashed lines mark onsets, "
        "clears and alerts.",
        "No training loss logged yet: call run.log({'train/loss': …}, step).",
        log_y=True,
        secondary=("memorization/train_progress", "memorization/population_progress"),
        secondary_title="cumulative progress",
        markers=True,
    ),
    Panel(
        "signal-graph", "signal-channel occupancy",
        ("signal/occupancy", "signal/occupancy_soft", "signal/population_fraction"),
        "fraction",
        "The share of gradient coordinates whose batch signal exceeds its leave-one-out noise "
        "(hard and soft gate), and the share above the training-set noise floor. Falling "
        "occupancy means more of each step is noise the network can only memorize.",
        "No gradient statistics yet: call run.watch(model, optimizer, batch_size=…).",
    ),
    Panel(
        "mem-graph", "memorization indicator",
        ("memorization/score", "memorization/tail_score", "memorization/signal_score",
         "memorization/signal_excess", "memorization/gradient_score",
         "memorization/disagree_fraction"),
        "score",
        "The memorization score (0 = learning what transfers, 1 = fitting what cannot) and its "
        "ingredients: the probe-tail score (training examples the network disagreed with, now "
        "being fitted), the signal score of full-batch training (the share of coordinates "
        "whose training-set gradient survives leaving one example out, beyond chance: the "
        "signal excess) and the gradient score 1 − Q̄/T̄. The alarm fires when the score "
        "stays above its threshold.",
        "No memorization score: watch(..., dataset_size=n, probe=(x, y)) enables it.",
        markers=True,
    ),
    Panel(
        "noise-graph", "noise scale, GSNR and agent cost",
        ("signal/noise_scale", "signal/gsnr_median", "agent/overhead"),
        "ratio",
        "Noise scale Σŝ/Σḡ² ≈ B_simple/b (above 1: batch noise dominates the step), the median "
        "gradient signal-to-noise ratio, and the fraction of step time the agent spends (right).",
        "No gradient statistics yet.",
        log_y=True,
        secondary=("agent/overhead",),
        secondary_title="agent overhead",
    ),
)  # fmt: skip


def _graph(graph_id: str, figure: Any) -> html.Div:
    """A graph in a box that has its figure's height from the first paint (dcc.Graph itself
    renders nothing until Plotly's bundle has loaded), so panels do not move as it draws."""
    height = f"{figure.layout.height or 320}px"
    graph = dcc.Graph(
        id=graph_id, figure=figure, config={"displaylogo": False}, style={"height": height}
    )
    return html.Div(graph, style={"minHeight": height})


def _panel(p: Panel) -> html.Div:
    return html.Div(
        [
            html.P(p.explain, className="explain"),
            html.P("", id={"type": "empty", "panel": p.graph}, className="empty"),
            _graph(
                p.graph,
                figures.series_figure(
                    p.title,
                    p.traces,
                    y_title=p.y_title,
                    log_y=p.log_y,
                    secondary=p.secondary,
                    secondary_title=p.secondary_title,
                    markers=p.markers,
                ),
            ),
        ],
        className="panel",
    )


def layout(run_id: str, refresh_ms: int, max_points: int) -> html.Div:
    """The run page layout for one run id; data fills in on the first tick."""
    return html.Div(
        [
            dcc.Store(id="run-id", data=run_id),
            dcc.Store(id="run-cursor", data={}),
            dcc.Store(id="run-max-points", data=max_points),
            dcc.Store(id="run-hist-new", data=[]),
            dcc.Store(id="run-hist", data=[]),
            dcc.Store(id="run-hist-entry", data=None),
            dcc.Store(id="run-layers", data=[]),
            dcc.Store(id="run-events", data=[]),
            html.Div(
                [
                    html.H2(run_id, id="run-title"),
                    html.Span("…", id="run-status", className="status"),
                    html.Span(["step ", html.B("0", id="run-step")], className="step"),
                    html.A("CSV", href=f"/api/runs/{run_id}/export?format=csv", className="link"),
                    html.A(
                        "Parquet",
                        href=f"/api/runs/{run_id}/export?format=parquet",
                        className="link",
                    ),
                ],
                className="run-header",
            ),
            html.Div(id="run-config", className="config"),
            html.Div([_panel(p) for p in PANELS[:2]], className="grid"),
            html.Div(
                [
                    html.P(
                        "Per-layer occupancy over time: each row is an emitted step, each "
                        "column a parameter tensor; dark cells are layers whose gradient is "
                        "mostly noise. Hover for the layer name.",
                        className="explain",
                    ),
                    html.P("", id="heatmap-empty", className="empty"),
                    _graph(
                        "heatmap-graph",
                        figures.heatmap_figure([], "occupancy per layer", "occupancy"),
                    ),
                ],
                className="panel",
            ),
            html.Div([_panel(p) for p in PANELS[2:]], className="grid"),
            html.Div(
                [
                    html.Div(
                        [
                            html.P(
                                "λ(W_s), the cumulative dissipation Gramian of the probe kernel: "
                                "a mode near ½ has dissipated its residual (signal channel), "
                                "near 0 it is untouched (reservoir); d_sig counts modes above "
                                "the cutoff.",
                                className="explain",
                            ),
                            html.P("", id="spectrum-empty", className="empty"),
                            _graph("spectrum-graph", figures.spectrum_trajectories(K_TRAJ)),
                        ],
                        className="panel",
                    ),
                    html.Div(
                        [
                            html.P(
                                "The latest spectrum; green bars are in the signal channel "
                                "(above the dashed cutoff).",
                                className="explain",
                            ),
                            _graph("spectrum-bars", figures.spectrum_bars(None)),
                        ],
                        className="panel",
                    ),
                ],
                className="grid",
            ),
            html.Div(
                [
                    html.P(
                        "Distribution of log₁₀(ḡ²/ŝ) per layer at a chosen step: mass right of "
                        "the dashed gate (0) is signal, left of it noise. Move the slider to "
                        "travel in time.",
                        className="explain",
                    ),
                    html.Div(
                        dcc.Slider(
                            id="hist-slider",
                            min=0,
                            max=0,
                            step=1,
                            value=0,
                            marks=None,
                            tooltip={"placement": "bottom"},
                            updatemode="drag",
                        ),
                        className="slider-box",
                    ),
                    _graph("hist-graph", figures.histogram_figure(None, [])),
                ],
                className="panel",
            ),
            html.Div(
                [
                    html.P(
                        "Alerts and events of this run, newest first: memorization onsets and "
                        "clears, rule alerts, non-finite values, start and finish.",
                        className="explain",
                    ),
                    html.Div(html.P("No events yet.", className="empty"), id="events-list"),
                ],
                className="panel",
            ),
            dcc.Interval(id="run-tick", interval=refresh_ms, n_intervals=0),
        ]
    )


# The histograms live in the browser only: a server callback taking them as State would
# upload all of them (layers × 24 counts × HIST_POINTS, ~1 MB at 48 layers) on every tick
# and every slider move. Three browser-side functions keep them; the server draws one.
#
# Append new entries and cap the list: while over the limit, every other one of the older
# entries is dropped (the newest is always kept), so a live run's history stays spread out.
_CAP_HIST_JS = """function(fresh, hist) {
    let entries = (hist || []).concat(fresh || []);
    while (entries.length > LIMIT) {
        entries = entries.slice(0, -1).filter((_, i) => i % 2 === 0).concat(entries.slice(-1));
    }
    return entries;
}"""


def cap_hist_js(limit: int) -> str:
    """The browser-side function (fresh, hist) → hist that appends and caps at ``limit``."""
    return _CAP_HIST_JS.replace("LIMIT", str(int(limit)))


# Slider range and marks; it follows the newest step unless moved back in time.
SLIDER_JS = """function(hist, value, oldMax) {
    const n = (hist || []).length;
    const last = Math.max(n - 1, 0);
    const next = (value === null || value === undefined || value >= (oldMax || 0)) ? last : value;
    const marks = {};
    for (let i = 0; i < n; i += Math.max(1, Math.floor(n / 6))) { marks[i] = String(hist[i].step); }
    return [last, next, marks];
}"""
# The one entry the slider points at.
PICK_JS = """function(value, hist) {
    if (!hist || hist.length === 0) { return null; }
    return hist[Math.min(value || 0, hist.length - 1)];
}"""


def _merge(
    a: tuple[dict[str, list[Any]], list[int]] | None,
    b: tuple[dict[str, list[Any]], list[int]] | None,
) -> tuple[dict[str, list[Any]], list[int]] | None:
    """One extendTraces update from two (keys present in one get empty lists in the other)."""
    if a is None or b is None:
        return a or b
    keys = set(a[0]) | set(b[0])
    data = {k: a[0].get(k, [[] for _ in a[1]]) + b[0].get(k, [[] for _ in b[1]]) for k in keys}
    return data, a[1] + b[1]


def _events_view(events: list[dict[str, Any]]) -> Any:
    if not events:
        return html.P("No events yet.", className="empty")
    rows = [
        html.Tr(
            [
                html.Td(str(e["step"]), className="num"),
                html.Td(html.Span(e["kind"], className=f"badge {e['severity']}")),
                html.Td(e["message"]),
            ]
        )
        for e in reversed(events[-EVENTS_SHOWN:])
    ]
    return html.Table(
        [
            html.Thead(html.Tr([html.Th("step"), html.Th("kind"), html.Th("message")])),
            html.Tbody(rows),
        ],
        id="events-table",
    )


def register(app: Dash, api: ApiClient) -> None:
    """Attach the run page callbacks to app."""

    @app.callback(
        Output("run-title", "children"),
        Output("run-config", "children"),
        Output("run-layers", "data"),
        Output("heatmap-graph", "figure"),
        Input("run-id", "data"),
    )
    async def header(run_id: str) -> tuple[Any, ...]:
        try:
            meta = await api.get(f"/api/runs/{run_id}")
        except ApiError as exc:
            return f"run {run_id}", html.P(exc.detail, className="error"), [], dash.no_update
        config = ", ".join(f"{k}={v}" for k, v in sorted(meta["config"].items()))
        layers = meta["layers"]
        heat = figures.heatmap_figure(layers, "occupancy per layer", "occupancy")
        return f"{meta['project']} / {meta['name']}", html.Code(config or "no config"), layers, heat

    panel_outputs = [Output(p.graph, "extendData") for p in PANELS]

    @app.callback(
        *panel_outputs,
        Output("heatmap-graph", "extendData"),
        Output("spectrum-graph", "extendData"),
        Output("spectrum-bars", "figure"),
        Output("run-hist-new", "data"),
        Output("run-events", "data"),
        Output("run-cursor", "data"),
        Output("run-step", "children"),
        Output("run-status", "children"),
        Output("run-tick", "disabled"),
        Output({"type": "empty", "panel": ALL}, "children"),
        Output("heatmap-empty", "children"),
        Output("spectrum-empty", "children"),
        Input("run-tick", "n_intervals"),
        State("run-cursor", "data"),
        State("run-id", "data"),
        State("run-max-points", "data"),
        State("run-events", "data"),
    )
    async def tick(
        _n: int,
        cursor: dict[str, str],
        run_id: str,
        max_points: int,
        events: list[dict[str, Any]],
    ) -> tuple[Any, ...]:
        cursor = dict(cursor or {})
        names = sorted({t for p in PANELS for t in p.traces})
        try:
            # The six reads are independent: issued together, the first paint waits for
            # the slowest one rather than for their sum.
            base = f"/api/runs/{run_id}"
            meta, scal, ev, lay, spec, hst = await asyncio.gather(
                api.get(base),
                api.get(f"{base}/scalars", names=",".join(names),
                        since=cursor.get("scalars"), max_points=max_points),
                api.get(f"{base}/events", since=cursor.get("events")),
                api.get(f"{base}/layers", names="occupancy",
                        since=cursor.get("layers"), max_points=min(max_points, HEATMAP_ROWS)),
                api.get(f"{base}/spectrum", since=cursor.get("spectrum"), max_points=max_points),
                api.get(f"{base}/hist", since=cursor.get("hist"), max_points=HIST_POINTS),
            )  # fmt: skip
        except ApiError as exc:
            n_out = len(PANELS) + 7  # the panels, heatmap, spectrum x2, hist, events, cursor, step
            return (*[dash.no_update] * n_out, f"error: {exc.detail}", exc.status == 404,
                    [dash.no_update] * len(PANELS), dash.no_update, dash.no_update)  # fmt: skip
        for key, body in (
            ("scalars", scal),
            ("events", ev),
            ("layers", lay),
            ("spectrum", spec),
            ("hist", hst),
        ):
            if body.get("cursor"):
                cursor[key] = body["cursor"]
        new_events = ev["events"]
        # The store goes back to the server with every tick: keep what the list shows.
        all_events = ((events or []) + new_events)[-EVENTS_SHOWN:]
        updates = []
        anything = bool(new_events)
        for p in PANELS:
            payload = figures.extend_payload(p.traces, scal["series"])
            if p.markers:
                payload = _merge(payload, figures.marker_payload(new_events, len(p.traces)))
            anything = anything or payload is not None
            updates.append((payload[0], payload[1], max_points) if payload else dash.no_update)
        occ = lay["series"].get("occupancy", {"step": [], "value": []})
        heat = figures.heatmap_payload(occ["step"], occ["value"])
        traj = figures.spectrum_payload(spec["entries"], K_TRAJ)
        bars = figures.spectrum_bars(spec["entries"][-1]) if spec["entries"] else dash.no_update
        anything = anything or bool(heat or traj or hst["entries"])
        done = meta["status"] in ("finished", "crashed") and not anything
        empties = []
        for p in PANELS:
            seen = any(t in scal["series"] for t in p.traces) or bool(cursor.get(f"seen:{p.graph}"))
            if any(t in scal["series"] for t in p.traces):
                cursor[f"seen:{p.graph}"] = "1"
            empties.append("" if seen else p.empty)
        if occ["step"]:
            cursor["seen:heatmap"] = "1"
        if spec["entries"]:
            cursor["seen:spectrum"] = "1"
        return (
            *updates,
            (heat[0], heat[1], HEATMAP_ROWS) if heat else dash.no_update,
            (traj[0], traj[1], max_points) if traj else dash.no_update,
            bars,
            hst["entries"] or dash.no_update,
            all_events if new_events else dash.no_update,
            cursor,
            str(meta["step"]),
            meta["status"],
            done,
            empties,
            ""
            if cursor.get("seen:heatmap")
            else "No per-layer statistics yet: call run.watch(...).",
            "" if cursor.get("seen:spectrum") else "No spectrum yet: watch(..., probe=(x, y)).",
        )

    @app.callback(Output("events-list", "children"), Input("run-events", "data"))
    def show_events(events: list[dict[str, Any]]) -> Any:
        return _events_view(events or [])

    app.clientside_callback(  # type: ignore[no-untyped-call]
        cap_hist_js(HIST_POINTS),
        Output("run-hist", "data"),
        Input("run-hist-new", "data"),
        State("run-hist", "data"),
    )
    app.clientside_callback(  # type: ignore[no-untyped-call]
        SLIDER_JS,
        Output("hist-slider", "max"),
        Output("hist-slider", "value"),
        Output("hist-slider", "marks"),
        Input("run-hist", "data"),
        State("hist-slider", "value"),
        State("hist-slider", "max"),
    )
    app.clientside_callback(  # type: ignore[no-untyped-call]
        PICK_JS,
        Output("run-hist-entry", "data"),
        Input("hist-slider", "value"),
        Input("run-hist", "data"),
    )

    @app.callback(
        Output("hist-graph", "figure"),
        Input("run-hist-entry", "data"),
        Input("run-layers", "data"),
    )
    def histogram(entry: dict[str, Any] | None, layers: list[str]) -> Any:
        return figures.histogram_figure(entry, layers or [])
