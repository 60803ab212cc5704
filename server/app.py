"""`create_app(settings)`: the FastAPI service (REST API, ingest reader, dashboard)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI, HTTPException

from server.alerts import AlertEngine
from server.alerts import router as alerts_router
from server.api import api, router
from server.auth import LOOPBACK
from server.embedded_redis import EmbeddedRedis
from server.ingest import Ingestor
from server.rollups import RollupWriter
from server.settings import Settings
from server.store import Store

log = logging.getLogger("channelscope.server")


async def stop_within(stop: Awaitable[None], timeout_s: float) -> bool:
    """Await a loop's stop() for at most timeout_s seconds; True when it finished in time.

    Not ``asyncio.wait_for``: on timeout it cancels and then waits for the cancelled
    awaitable to finish, which is forever for a stop() stuck on a task that swallows its
    cancellation. Here the stop is cancelled and left behind."""
    task = asyncio.ensure_future(stop)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if task in done:
        return not task.cancelled() and task.exception() is None
    task.cancel()
    return False


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; Redis connections and the ingest reader start with its lifespan.

    With no ``redis_url`` configured, the lifespan starts the embedded redis-server and
    publishes its endpoint for agents on this machine.
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        embedded: EmbeddedRedis | None = None
        url = settings.redis_url
        if url is None:
            embedded = EmbeddedRedis(settings.home / "redis").start()
            embedded.publish()
            url = embedded.url
            log.warning("embedded Redis at %s (data in %s)", url, embedded.data_dir)
        app.state.redis_url = url
        client = aioredis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        store = Store(client, settings.prefix, settings.crashed_after_s, settings.stalled_after_s)
        ingestor = Ingestor(store, settings.poll_interval_s)
        alerts = AlertEngine(store, settings.poll_interval_s)
        rollups = RollupWriter(store, settings.poll_interval_s)
        app.state.store = store
        app.state.ingestor = ingestor
        app.state.alerts = alerts
        app.state.rollups = rollups
        ingestor.start()
        alerts.start()
        rollups.start()
        try:
            yield
        finally:
            # Background loops get a bounded time to stop (the notifier finishes a delivery
            # first), so shutdown never hangs on one.
            for stop in (rollups.stop(), alerts.stop(), ingestor.stop()):
                if not await stop_within(stop, 10.0):
                    log.warning("a background task did not stop in time")
            await client.aclose()
            if embedded is not None:
                embedded.unpublish()
                embedded.stop()

    app = FastAPI(
        title="channelscope",
        version="0.1.0",
        summary="Live signal/noise monitor for PyTorch training runs",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.auth_required = settings.auth == "on" or (
        settings.auth == "auto" and settings.host not in LOOPBACK
    )
    if not app.state.auth_required:
        log.warning(
            "channelscope: API without tokens (bound to %s); anyone on this machine can read it",
            settings.host,
        )
    app.include_router(router)
    app.include_router(api)
    app.include_router(alerts_router)

    # Registered before the dashboard's catch-all page route, so an unknown API path is
    # a JSON 404 and not the dashboard's HTML.
    @app.api_route(
        "/api/{path:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False
    )
    async def unknown_api(path: str) -> None:
        raise HTTPException(status_code=404, detail=f"no API route /api/{path}")

    if settings.dashboard:
        from dashboard.app import create_dash_app
        from server.signin import install

        install(app)
        create_dash_app(settings, app)
    return app
