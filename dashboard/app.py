"""The Dash front end, attached to the server's FastAPI app (Dash's FastAPI backend)."""

from __future__ import annotations

from typing import Any

from dash import Dash, Input, Output, dcc, html

from dashboard import run_page, runs_page
from dashboard.api_client import ApiClient

CSS = """
body { font-family: system-ui, sans-serif; margin: 0; color: #0f172a; background: #f8fafc; }
.topbar { display: flex; gap: 1.5rem; align-items: center; padding: .6rem 1.2rem;
          background: #0f172a; color: white; }
.topbar a { color: #cbd5e1; text-decoration: none; }
.content { padding: 1rem 1.5rem; max-width: 1600px; }
table { border-collapse: collapse; width: 100%; background: white; }
th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid #e2e8f0; }
td.num { font-variant-numeric: tabular-nums; }
.panel { background: white; border: 1px solid #e2e8f0; border-radius: 6px; padding: .5rem;
         margin: .8rem 0; min-height: 360px; }
.explain { color: #475569; font-size: .9rem; margin: .2rem 0 .4rem; }
.run-header { display: flex; gap: 1.2rem; align-items: baseline; }
.status { font-weight: 600; }
.error { color: #dc2626; }
.empty { color: #64748b; font-style: italic; }
"""


def create_dash_app(settings: Any, server: Any) -> Dash:
    """Build the dashboard on the FastAPI app ``server``; it reads only the HTTP API."""
    api = ApiClient(app=server)
    app = Dash(
        __name__,
        server=server,
        title="channelscope",
        suppress_callback_exceptions=True,
        update_title="",
    )
    app.index_string = app.index_string.replace("{%css%}", "{%css%}<style>" + CSS + "</style>")
    app.layout = html.Div(
        [
            dcc.Location(id="url"),
            html.Div(
                [html.B("channelscope"), dcc.Link("Runs", href="/")],
                className="topbar",
            ),
            html.Div(id="page", className="content"),
        ]
    )

    @app.callback(Output("page", "children"), Input("url", "pathname"))
    def route(pathname: str | None) -> Any:
        path = pathname or "/"
        if path.startswith("/runs/"):
            run_id = path.removeprefix("/runs/").strip("/")
            return run_page.layout(
                run_id, settings.dashboard_refresh_ms, settings.default_max_points
            )
        return runs_page.layout(settings.dashboard_refresh_ms)

    runs_page.register(app, api)
    run_page.register(app, api)
    return app
