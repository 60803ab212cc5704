"""The alert rules page: list, create, edit and delete a project's rules; test a webhook."""

from __future__ import annotations

from typing import Any

from dash import ALL, Dash, Input, Output, State, ctx, dcc, html

from dashboard.api_client import ApiClient, ApiError

KINDS = ["threshold", "non_finite", "memorization_onset", "stalled"]


def rules_table(rules: list[dict[str, Any]]) -> Any:
    """The rules table (pure)."""
    if not rules:
        return html.P("No rules for this project yet.", className="empty")
    rows = []
    for r in rules:
        what = {
            "threshold": f"{r.get('series')} {r.get('op')} {r.get('value')} for {r.get('for_points')} points",
            "non_finite": f"non-finite {r.get('series') or 'any series'}",
            "memorization_onset": "memorization onset",
            "stalled": f"no data for {r.get('seconds')} s",
        }[r["kind"]]
        rows.append(
            html.Tr(
                [
                    html.Td(html.Code(r["id"])),
                    html.Td(r.get("name") or r["kind"]),
                    html.Td(what),
                    html.Td(r.get("webhook_url") or "—"),
                    html.Td(f"{r.get('cooldown_s')} s"),
                    html.Td(
                        [
                            html.Button("edit", id={"type": "rule-edit", "id": r["id"]}),
                            html.Button("test", id={"type": "rule-test", "id": r["id"]}),
                            html.Button("delete", id={"type": "rule-delete", "id": r["id"]}),
                        ]
                    ),
                ]
            )
        )
    head = html.Tr([html.Th(h) for h in ("id", "name", "condition", "webhook", "cooldown", "")])
    return html.Table([html.Thead(head), html.Tbody(rows)], id="rules-table")


def layout() -> html.Div:
    """The rules page layout."""
    return html.Div(
        [
            html.H2("Alert rules"),
            html.P(
                "Rules are evaluated by the server on every record of every run of the project; "
                "a fired rule becomes an event on the run and, with a webhook, a notification "
                "(JSON or Slack format), at most once per cooldown.",
                className="explain",
            ),
            html.Div(
                [dcc.Input(id="rules-project", placeholder="project", debounce=True, value="")],
                className="filters",
            ),
            html.Div(id="rules-body", className="panel"),
            html.H3("Create or edit a rule"),
            dcc.Store(id="rule-editing", data=None),
            html.Div(
                [
                    dcc.Dropdown(id="rule-kind", options=KINDS, value="threshold", clearable=False),
                    dcc.Input(id="rule-name", placeholder="name"),
                    dcc.Input(id="rule-series", placeholder="series, e.g. train/loss"),
                    dcc.Dropdown(
                        id="rule-op", options=["above", "below"], value="above", clearable=False
                    ),
                    dcc.Input(id="rule-value", type="number", placeholder="value"),
                    dcc.Input(
                        id="rule-points", type="number", value=1, min=1, placeholder="for N points"
                    ),
                    dcc.Input(
                        id="rule-seconds", type="number", value=300, placeholder="stalled after s"
                    ),
                    dcc.Input(id="rule-webhook", placeholder="webhook URL"),
                    dcc.Dropdown(
                        id="rule-format", options=["json", "slack"], value="json", clearable=False
                    ),
                    dcc.Input(
                        id="rule-cooldown", type="number", value=600, placeholder="cooldown s"
                    ),
                    html.Button("Save rule", id="rule-save"),
                ],
                className="form",
            ),
            html.P("", id="rules-message"),
        ]
    )


def register(app: Dash, api: ApiClient) -> None:
    """Attach the rules page callbacks to app."""

    @app.callback(
        Output("rules-body", "children"),
        Output("rules-message", "children"),
        Output("rule-editing", "data"),
        Input("rules-project", "value"),
        Input("rule-save", "n_clicks"),
        Input({"type": "rule-delete", "id": ALL}, "n_clicks"),
        Input({"type": "rule-test", "id": ALL}, "n_clicks"),
        Input({"type": "rule-edit", "id": ALL}, "n_clicks"),
        State("rule-editing", "data"),
        State("rule-kind", "value"),
        State("rule-name", "value"),
        State("rule-series", "value"),
        State("rule-op", "value"),
        State("rule-value", "value"),
        State("rule-points", "value"),
        State("rule-seconds", "value"),
        State("rule-webhook", "value"),
        State("rule-format", "value"),
        State("rule-cooldown", "value"),
    )
    async def rules(project: str, _save: Any, _del: Any, _test: Any, _edit: Any, editing: str | None,
                    kind: str, name: str | None, series: str | None, op: str, value: float | None,
                    points: int | None, seconds: float | None, webhook: str | None, fmt: str,
                    cooldown: float | None) -> tuple[Any, str, Any]:  # fmt: skip
        if not project:
            return html.P("Enter a project name.", className="empty"), "", None
        base = f"/api/projects/{project}/rules"
        message = ""
        trigger = ctx.triggered_id
        try:
            if trigger == "rule-save":
                body = {"kind": kind, "name": name or "", "series": series or None, "op": op,
                        "value": value, "for_points": points or 1, "seconds": seconds or 300,
                        "webhook_url": webhook or None, "webhook_format": fmt,
                        "cooldown_s": cooldown or 600}  # fmt: skip
                if editing:
                    await api.request("PUT", f"{base}/{editing}", json=body)
                    message, editing = f"Rule {editing} saved.", None
                else:
                    made = await api.request("POST", base, json=body)
                    message = f"Rule {made['id']} created."
            elif isinstance(trigger, dict) and ctx.triggered[0]["value"]:
                rid = trigger["id"]
                if trigger["type"] == "rule-delete":
                    await api.request("DELETE", f"{base}/{rid}")
                    message = f"Rule {rid} deleted."
                elif trigger["type"] == "rule-test":
                    res = await api.request("POST", f"{base}/{rid}/test")
                    message = f"Test notification: {'delivered' if res['delivered'] else 'failed'} (HTTP {res['status']})."
                else:
                    editing, message = rid, f"Editing rule {rid}: change the form and save."
            data = await api.get(base)
        except ApiError as exc:
            return html.P(exc.detail, className="error"), f"Error: {exc.detail}", editing
        return rules_table(data["rules"]), message, editing
