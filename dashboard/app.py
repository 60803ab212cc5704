"""The Dash front end, attached to the server's FastAPI app (Dash's FastAPI backend)."""

from __future__ import annotations

from typing import Any

from dash import Dash, Input, Output, State, dcc, html

from dashboard import compare_page, rules_page, run_page, runs_page
from dashboard.api_client import ApiClient

# The dark palette, chosen by the toggle or, on "auto", by the operating system.
DARK = "--bg: #0b1120; --fg: #e2e8f0; --panel: #111827; --line: #1f2937; --muted: #94a3b8;"
CSS = """
:root { --bg: #f8fafc; --fg: #0f172a; --panel: #ffffff; --line: #e2e8f0; --muted: #475569; }
:root[data-theme="dark"] { DARK }
@media (prefers-color-scheme: dark) { :root:not([data-theme="light"]) { DARK } }
body { font-family: system-ui, sans-serif; margin: 0; color: var(--fg); background: var(--bg); }
.topbar { display: flex; gap: 1.5rem; align-items: center; padding: .6rem 1.2rem;
          background: #0f172a; color: white; }
.topbar a { color: #cbd5e1; text-decoration: none; }
.content { padding: 1rem 1.5rem; max-width: 2400px; margin: 0 auto; }
table { border-collapse: collapse; width: 100%; background: var(--panel); }
th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid var(--line); }
td.num { font-variant-numeric: tabular-nums; }
.panel { background: var(--panel); border: 1px solid var(--line); border-radius: 6px;
         padding: .5rem; margin: .8rem 0; min-height: 200px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: .8rem; }
.grid > .panel { margin: 0; }
.explain { color: var(--muted); font-size: .9rem; margin: .2rem 0 .4rem; }
.run-header { display: flex; gap: 1.2rem; align-items: baseline; flex-wrap: wrap; }
.status { font-weight: 600; }
.error { color: #dc2626; }
.empty { color: var(--muted); font-style: italic; min-height: 1.2em; margin: 0; }
.badge { padding: .1rem .45rem; border-radius: 999px; font-size: .8rem; }
.badge.warning { background: #fef3c7; color: #92400e; }
.badge.error { background: #fee2e2; color: #991b1b; }
.badge.info { background: #e0f2fe; color: #075985; }
.filters { display: flex; gap: .6rem; flex-wrap: wrap; align-items: center; margin: .6rem 0; }
.filters > * { min-width: 180px; max-width: 420px; }
.form { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: .6rem;
        max-width: 1200px; margin: .6rem 0; }
.spark { height: 30px; width: 120px; }
.link { font-size: .85rem; }
/* Room reserved for what arrives after the first paint, so nothing below it moves. */
.config { min-height: 1.5em; }
.step b { display: inline-block; min-width: 8ch; font-variant-numeric: tabular-nums; }
.status { display: inline-block; min-width: 7ch; }
.slider-box { min-height: 48px; }
.theme-toggle { margin-left: auto; background: transparent; color: #cbd5e1;
                border: 1px solid #334155; border-radius: 4px; padding: .15rem .5rem;
                cursor: pointer; font: inherit; font-size: .85rem; }
""".replace("DARK", DARK)


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
                [
                    html.B("channelscope"),
                    dcc.Link("Runs", href="/"),
                    dcc.Link("Compare", href="/compare"),
                    dcc.Link("Alert rules", href="/rules"),
                    html.Button(id="theme-toggle", className="theme-toggle", n_clicks=0),
                ],
                className="topbar",
            ),
            # The theme choice lives in the browser (per user, not per team): auto
            # follows the operating system's light/dark setting.
            dcc.Store(id="theme", storage_type="local", data="auto"),
            html.Div(id="page", className="content"),
        ]
    )
    app.clientside_callback(  # type: ignore[no-untyped-call]
        """function(n, theme) {
            const order = ["auto", "light", "dark"];
            const current = order.includes(theme) ? theme : "auto";
            const ctx = window.dash_clientside.callback_context;
            const clicked = n > 0 && ctx.triggered.some(t => t.prop_id === "theme-toggle.n_clicks");
            const next = clicked ? order[(order.indexOf(current) + 1) % 3] : current;
            if (next === "auto") { delete document.documentElement.dataset.theme; }
            else { document.documentElement.dataset.theme = next; }
            return [next, "theme: " + next];
        }""",
        Output("theme", "data"),
        Output("theme-toggle", "children"),
        Input("theme-toggle", "n_clicks"),
        State("theme", "data"),
    )

    @app.callback(Output("page", "children"), Input("url", "pathname"))
    def route(pathname: str | None) -> Any:
        path = pathname or "/"
        if path.startswith("/runs/"):
            run_id = path.removeprefix("/runs/").strip("/")
            return run_page.layout(
                run_id, settings.dashboard_refresh_ms, settings.dashboard_max_points
            )
        if path.startswith("/compare"):
            return compare_page.layout()
        if path.startswith("/rules"):
            return rules_page.layout()
        return runs_page.layout(settings.dashboard_refresh_ms)

    for page in (runs_page, run_page, compare_page, rules_page):
        page.register(app, api)
    return app
