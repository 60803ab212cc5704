"""The run page: header with status and step, the live training loss and the
signal-channel occupancy.

New points arrive by incremental reads (the API's cursor) and are appended with
Plotly's extendTraces through the graph's ``extendData``; history is never re-sent.
"""

from __future__ import annotations

from typing import Any

import dash
from dash import Dash, Input, Output, State, dcc, html

from dashboard import figures
from dashboard.api_client import ApiClient, ApiError

LOSS_TRACES = ("train/loss",)
SIGNAL_TRACES = ("signal/occupancy", "signal/occupancy_soft", "signal/population_fraction")


def layout(run_id: str, refresh_ms: int, max_points: int) -> html.Div:
    """The run page layout for one run id; data fills in on the first tick."""
    return html.Div(
        [
            dcc.Store(id="run-id", data=run_id),
            dcc.Store(id="run-cursor", data=None),
            dcc.Store(id="run-max-points", data=max_points),
            html.Div(
                [
                    html.H2(run_id, id="run-title"),
                    html.Span("…", id="run-status", className="status"),
                    html.Span(["step ", html.B("0", id="run-step")], className="step"),
                ],
                className="run-header",
            ),
            html.Div(id="run-config", className="config"),
            html.Div(
                [
                    html.P(
                        "Training loss as logged by the run; new points are appended live.",
                        className="explain",
                    ),
                    dcc.Graph(
                        id="loss-graph",
                        figure=figures.series_figure("training loss", LOSS_TRACES, y_title="loss"),
                        config={"displaylogo": False},
                    ),
                ],
                className="panel",
            ),
            html.Div(
                [
                    html.P(
                        "Signal-channel occupancy: the share of gradient coordinates whose "
                        "batch signal exceeds its leave-one-out noise (hard gate, soft gate), "
                        "and the share above the training-set noise floor. Falling occupancy "
                        "means more of each step is noise the network can only memorize.",
                        className="explain",
                    ),
                    dcc.Graph(
                        id="signal-graph",
                        figure=figures.series_figure(
                            "signal-channel occupancy", SIGNAL_TRACES, y_title="fraction"
                        ),
                        config={"displaylogo": False},
                    ),
                ],
                className="panel",
            ),
            dcc.Interval(id="run-tick", interval=refresh_ms, n_intervals=0),
        ]
    )


def register(app: Dash, api: ApiClient) -> None:
    """Attach the run page callbacks to app."""

    @app.callback(
        Output("run-title", "children"),
        Output("run-config", "children"),
        Input("run-id", "data"),
    )
    async def header(run_id: str) -> tuple[Any, Any]:
        try:
            meta = await api.get(f"/api/runs/{run_id}")
        except ApiError as exc:
            return f"run {run_id}", html.P(exc.detail, className="error")
        config = ", ".join(f"{k}={v}" for k, v in sorted(meta["config"].items()))
        return f"{meta['project']} / {meta['name']}", html.Code(config or "no config")

    @app.callback(
        Output("loss-graph", "extendData"),
        Output("signal-graph", "extendData"),
        Output("run-cursor", "data"),
        Output("run-step", "children"),
        Output("run-status", "children"),
        Output("run-tick", "disabled"),
        Input("run-tick", "n_intervals"),
        State("run-cursor", "data"),
        State("run-id", "data"),
        State("run-max-points", "data"),
    )
    async def tick(_n: int, cursor: str | None, run_id: str, max_points: int) -> tuple[Any, ...]:
        try:
            meta = await api.get(f"/api/runs/{run_id}")
            data = await api.get(
                f"/api/runs/{run_id}/scalars",
                names=",".join(LOSS_TRACES + SIGNAL_TRACES),
                since=cursor,
                max_points=max_points,
            )
        except ApiError as exc:
            error = f"error: {exc.detail}"
            return dash.no_update, dash.no_update, cursor, dash.no_update, error, exc.status == 404
        loss = figures.extend_payload(LOSS_TRACES, data["series"])
        signal = figures.extend_payload(SIGNAL_TRACES, data["series"])
        done = meta["status"] in ("finished", "crashed") and loss is None and signal is None
        return (
            (loss[0], loss[1], max_points) if loss else dash.no_update,
            (signal[0], signal[1], max_points) if signal else dash.no_update,
            data["cursor"],
            str(meta["step"]),
            meta["status"],
            done,
        )
