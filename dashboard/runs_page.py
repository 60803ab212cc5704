"""The runs page: every run with its project, status, step and last update."""

from __future__ import annotations

import datetime as dt
from typing import Any

from dash import Dash, Input, Output, dcc, html

from dashboard.api_client import ApiClient, ApiError

STATUS_COLOURS = {
    "running": "#16a34a",
    "finished": "#64748b",
    "crashed": "#dc2626",
    "stalled": "#ea580c",
}


def _when(ts: float) -> str:
    if not ts:
        return "—"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def runs_table(runs: list[dict[str, Any]]) -> html.Table | html.P:
    """The runs table (pure: rows in, component out)."""
    if not runs:
        return html.P(
            "No runs yet. Start one with monitor_agent.init(...) or `channelscope demo`.",
            className="empty",
        )
    header = html.Tr([html.Th(h) for h in ("project", "name", "run", "status", "step", "updated")])
    rows = [
        html.Tr(
            [
                html.Td(r["project"]),
                html.Td(dcc.Link(r["name"] or r["run_id"], href=f"/runs/{r['run_id']}")),
                html.Td(html.Code(r["run_id"])),
                html.Td(
                    html.Span(
                        r["status"],
                        className="status",
                        style={"color": STATUS_COLOURS.get(r["status"], "#111")},
                    )
                ),
                html.Td(str(r["step"]), className="num"),
                html.Td(_when(r["updated_at"])),
            ],
            className="run-row",
        )
        for r in runs
    ]
    return html.Table([html.Thead(header), html.Tbody(rows)], id="runs-table")


def layout(refresh_ms: int) -> html.Div:
    """The runs page layout; the table fills in on the first refresh."""
    return html.Div(
        [
            html.H2("Runs"),
            html.P(
                "All runs, most recently active first. Click a run to watch it live.",
                className="explain",
            ),
            html.Div(id="runs-body", children=html.P("Loading…", className="empty")),
            dcc.Interval(id="runs-tick", interval=max(refresh_ms, 2000), n_intervals=0),
        ]
    )


def register(app: Dash, api: ApiClient) -> None:
    """Attach the runs page callbacks to app."""

    @app.callback(Output("runs-body", "children"), Input("runs-tick", "n_intervals"))
    async def refresh(_n: int) -> Any:
        try:
            data = await api.get("/api/runs")
        except ApiError as exc:
            return html.P(f"Could not load runs: {exc.detail}", className="error")
        return runs_table(data["runs"])
