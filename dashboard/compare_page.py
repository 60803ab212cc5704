"""The compare page: 2–6 runs, one scalar overlaid, aligned by step or by wall time."""

from __future__ import annotations

from typing import Any

from dash import Dash, Input, Output, State, dcc, html

from dashboard import figures
from dashboard.api_client import ApiClient, ApiError

MAX_RUNS = 6


def layout() -> html.Div:
    """The compare page layout."""
    return html.Div(
        [
            html.H2("Compare runs"),
            html.P(
                "Choose two to six runs and a series to overlay them; align by step to compare "
                "training progress, by wall time to compare speed.",
                className="explain",
            ),
            html.Div(
                [
                    dcc.Dropdown(id="cmp-runs", multi=True, placeholder="runs (2–6)"),
                    dcc.Dropdown(id="cmp-series", value="train/loss", clearable=False),
                    dcc.RadioItems(
                        id="cmp-align", options=["step", "wall time"], value="step", inline=True
                    ),
                    dcc.Checklist(id="cmp-log", options=["log y"], value=[], inline=True),
                ],
                className="filters",
            ),
            html.P("", id="cmp-message", className="empty"),
            html.Div(
                dcc.Graph(id="cmp-graph", figure=figures.compare_figure("", [])), className="panel"
            ),
        ]
    )


def register(app: Dash, api: ApiClient) -> None:
    """Attach the compare page callbacks to app."""

    @app.callback(Output("cmp-runs", "options"), Input("cmp-runs", "id"))
    async def run_options(_id: str) -> list[dict[str, str]]:
        try:
            runs = (await api.get("/api/runs"))["runs"]
        except ApiError:
            return []
        return [
            {"label": f"{r['project']} / {r['name']} ({r['run_id']})", "value": r["run_id"]}
            for r in runs
        ]

    @app.callback(
        Output("cmp-series", "options"),
        Output("cmp-series", "value"),
        Input("cmp-runs", "value"),
        State("cmp-series", "value"),
    )
    async def series_options(
        run_ids: list[str] | None, current: str | None
    ) -> tuple[list[str], str]:
        names: set[str] = set()
        for run_id in (run_ids or [])[:MAX_RUNS]:
            try:
                data = await api.get(f"/api/runs/{run_id}/scalars", max_points=2)
            except ApiError:
                continue
            names.update(data["series"])
        options = sorted(names) or ["train/loss"]
        if current in options:
            return options, current
        return options, "train/loss" if "train/loss" in options else options[0]

    @app.callback(
        Output("cmp-graph", "figure"),
        Output("cmp-message", "children"),
        Input("cmp-runs", "value"),
        Input("cmp-series", "value"),
        Input("cmp-align", "value"),
        Input("cmp-log", "value"),
    )
    async def draw(
        run_ids: list[str] | None, series: str, align: str, log: list[str]
    ) -> tuple[Any, str]:
        run_ids = run_ids or []
        if not 2 <= len(run_ids) <= MAX_RUNS:
            return figures.compare_figure(series, []), f"Choose 2 to {MAX_RUNS} runs."
        traces = []
        for run_id in run_ids:
            try:
                meta = await api.get(f"/api/runs/{run_id}")
                data = await api.get(
                    f"/api/runs/{run_id}/scalars", names=series, max_points=2000, with_time=True
                )
            except ApiError as exc:
                return figures.compare_figure(series, []), exc.detail
            s = data["series"].get(series, {"step": [], "value": []})
            if align == "wall time":
                x = [t - meta["started_at"] for t in s.get("wall_time", [])]
            else:
                x = s["step"]
            traces.append((f"{meta['name']} ({run_id})", {"x": x, "value": s["value"]}))
        x_title = "seconds since start" if align == "wall time" else "step"
        fig = figures.compare_figure(series, traces, x_title=x_title, log_y=bool(log))
        missing = [label for label, t in traces if not t["x"]]
        return fig, ("No data for: " + ", ".join(missing)) if missing else ""
