"""Dashboard sign-in: a token kept in an HTTP-only cookie, never in URLs.

When the API requires tokens, every dashboard page and Dash callback needs the cookie;
pages without it redirect to /signin. The cookie's token is handed to the dashboard's
API client through a context variable for the duration of the request, so the dashboard
reads the API with the signed-in user's rights and nothing more.
"""

from __future__ import annotations

import contextvars
import html
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from server.api import COOKIE
from server.auth import resolve

current_token: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "channelscope_token", default=None
)

OPEN_PATHS = ("/signin", "/healthz", "/readyz", "/docs", "/openapi.json", "/api/", "/_favicon")

PAGE = """<!doctype html><html><head><title>channelscope · sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;display:grid;place-items:center;height:100vh;
margin:0;background:#0f172a;color:#e2e8f0}}form{{background:#1e293b;padding:2rem;
border-radius:8px;min-width:22rem}}input{{width:100%;padding:.5rem;margin:.5rem 0 1rem;
box-sizing:border-box}}button{{padding:.5rem 1rem}}.error{{color:#f87171}}</style></head>
<body><form method="post" action="/signin"><h2>channelscope</h2>
<label for="token">API token</label><input id="token" name="token" type="password"
autocomplete="off" required autofocus><p class="error">{error}</p>
<button type="submit">Sign in</button></form></body></html>"""


def install(app: FastAPI) -> None:
    """Add the sign-in routes and the middleware that guards dashboard pages."""

    @app.get("/signin", include_in_schema=False)
    async def signin_form() -> HTMLResponse:
        return HTMLResponse(PAGE.format(error=""))

    @app.post("/signin", include_in_schema=False)
    async def signin(request: Request) -> Response:
        form = parse_qs((await request.body()).decode())
        token = (form.get("token") or [""])[0].strip()
        store = request.app.state.store
        if not token or await resolve(store.client, app.state.settings.prefix, token) is None:
            return HTMLResponse(PAGE.format(error=html.escape("Unknown or revoked token.")), 401)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(
            COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            max_age=30 * 24 * 3600,
        )
        return resp

    @app.post("/signout", include_in_schema=False)
    async def signout() -> Response:
        resp = RedirectResponse("/signin", status_code=303)
        resp.delete_cookie(COOKIE)
        return resp

    @app.middleware("http")
    async def guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        token = request.cookies.get(COOKIE)
        reset = current_token.set(token)
        try:
            path = request.url.path
            if request.app.state.auth_required and not path.startswith(OPEN_PATHS):
                ok = token is not None and (
                    await resolve(request.app.state.store.client, app.state.settings.prefix, token)
                    is not None
                )
                if not ok:
                    if path.startswith("/_dash"):
                        return Response("sign in first", status_code=401)
                    return RedirectResponse("/signin", status_code=303)
            return await call_next(request)
        finally:
            current_token.reset(reset)
