"""The runs page: every run with status, step, occupancy, memorization score and alerts,
filtered by project, status and text, sortable, refreshed automatically."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from dash import Dash, Input, Output, dcc, html

from dashboard import figures
from dashboard.api_client import ApiClient, ApiError

STATUS_COLOURS = {
    "running": "#16a34a",
    "finished": "#64748b",
    "crashed": "#dc2626",
    "stalled": "#ea580c",
}
SORTS = {
    "updated": ("updated_at", True),
    "name": ("name", False),
    "step": ("step", True),
    "memorization": ("memorization_score", True),
    "occupancy": ("occupancy", False),
}


def _when(ts: float) -> str:
    if not ts:
        return "—"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "—" if x is None or not math.isfinite(x) else fmt.format(x)


def sort_runs(runs: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Runs sorted by one of SORTS (missing values last)."""
    field, reverse = SORTS.get(key, SORTS["updated"])

    def k(r: dict[str, Any]) -> tuple[int, Any]:
        v = r.get(field)
        missing = v is None or (isinstance(v, float) and not math.isfinite(v))
        return (
            1 if missing else 0,
            (-v if reverse and not missing and isinstance(v, int | float) else v)
            if not missing
            else 0,
        )

    if field == "name":
        return sorted(runs, key=lambda r: str(r.get("name", "")).lower())
    return sorted(runs, key=k)


def runs_table(runs: list[dict[str, Any]]) -> html.Table | html.P:
    """The runs table (pure: rows in, component out)."""
    if not runs:
        return html.P(
            "No runs match. Start one with monitor_agent.init(...) or `channelscope demo`.",
            className="empty",
        )
    header = html.Tr(
        [
            html.Th(h)
            for h in (
                "project",
                "name",
                "run",
                "status",
                "step",
                "occupancy",
                "trend",
                "memorization",
                "alerts",
                "updated",
            )
        ]
    )
    rows = []
    for r in runs:
        score = r.get("memorization_score")
        alerts = r.get("alerts", 0)
        rows.append(
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
                    html.Td(_num(r.get("occupancy")), className="num"),
                    html.Td(
                        dcc.Graph(
                            figure=figures.sparkline(r.get("occupancy_spark") or []),
                            config={"staticPlot": True},
                            className="spark",
                        )
                        if r.get("occupancy_spark")
                        else "—"
                    ),
                    html.Td(
                        html.Span(
                            _num(score, "{:.2f}"),
                            className="badge warning" if score is not None and score >= 0.3 else "",
                        )
                    ),
                    html.Td(html.Span(str(alerts), className="badge error") if alerts else "0"),
                    html.Td(_when(r["updated_at"])),
                ],
                className="run-row",
            )
        )
    return html.Table([html.Thead(header), html.Tbody(rows)], id="runs-table")


def layout(refresh_ms: int) -> html.Div:
    """The runs page layout; the table fills in on the first refresh."""
    return html.Div(
        [
            html.H2("Runs"),
            html.P(
                "All runs, most recently active first. Occupancy is the share of gradient "
                "coordinates carrying signal; the memorization score rises when the run fits "
                "what will not transfer. Click a run to watch it live.",
                className="explain",
            ),
            html.Div(
                [
                    dcc.Input(id="runs-project", placeholder="project", debounce=True),
                    dcc.Dropdown(
                        id="runs-status",
                        placeholder="status",
                        options=list(STATUS_COLOURS),
                        clearable=True,
                    ),
                    dcc.Input(id="runs-q", placeholder="search name or id", debounce=True),
                    dcc.Dropdown(
                        id="runs-sort", options=list(SORTS), value="updated", clearable=False
                    ),
                ],
                className="filters",
            ),
            html.Div(id="runs-body", children=html.P("Loading…", className="empty")),
            dcc.Interval(id="runs-tick", interval=max(refresh_ms, 2000), n_intervals=0),
        ]
    )


def register(app: Dash, api: ApiClient) -> None:
    """Attach the runs page callbacks to app."""

    @app.callback(
        Output("runs-body", "children"),
        Input("runs-tick", "n_intervals"),
        Input("runs-project", "value"),
        Input("runs-status", "value"),
        Input("runs-q", "value"),
        Input("runs-sort", "value"),
    )
    async def refresh(_n: int, project: str | None, status: str | None, q: str | None,
                      sort: str | None) -> Any:  # fmt: skip
        try:
            data = await api.get(
                "/api/runs", project=project or None, status=status or None, q=q or None
            )
        except ApiError as exc:
            return html.P(f"Could not load runs: {exc.detail}", className="error")
        return runs_table(sort_runs(data["runs"], sort or "updated"))
