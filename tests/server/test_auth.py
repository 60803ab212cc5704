"""Every API route refuses a missing, wrong or too-weak token; the routes are enumerated
from the app, so a new route cannot slip through unprotected."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

import monitor_agent as cs
from server.auth import create_token
from server.embedded_redis import free_port
from server.settings import Settings
from tests.conftest import LiveServer

WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture
def secured(redis_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    settings = Settings(redis_url=redis_url, port=free_port(), home=tmp_path, auth="on")
    server = LiveServer(settings).start()
    yield server
    server.stop()


def _api_routes(server: LiveServer) -> list[tuple[str, str]]:
    # The OpenAPI document lists every route the app serves, however routers are nested.
    paths = server.app.openapi()["paths"]
    return sorted(
        (method.upper(), path)
        for path, ops in paths.items()
        if path.startswith("/api/")
        for method in ops
    )


def _url(path: str, run_id: str) -> str:
    return path.replace("{run_id}", run_id).replace("{project}", "p").replace("{rule_id}", "r1")


def test_every_api_route_needs_a_token_and_the_right_role(
    secured: LiveServer, redis_url: str, redis_client: redis.Redis
) -> None:
    run = cs.init("p", "auth", redis_url=redis_url)
    run.log({"x": 1.0}, 0)
    run.finish()
    read, _ = create_token(redis_client, "cs:", "read", "*")
    routes = _api_routes(secured)
    assert len(routes) >= 8
    with httpx.Client(base_url=secured.url, timeout=10) as client:
        for method, path in routes:
            url = _url(path, run.id)
            assert client.request(method, url).status_code == 401, (method, path)
            bad = {"Authorization": "Bearer cs_not-a-token"}
            assert client.request(method, url, headers=bad).status_code == 401, (method, path)
            if method in WRITE_METHODS:
                weak = {"Authorization": f"Bearer {read}"}
                assert client.request(method, url, headers=weak).status_code == 403, (method, path)
        assert client.get("/healthz").status_code == 200


def test_project_scope_and_revocation(
    secured: LiveServer, redis_url: str, redis_client: redis.Redis
) -> None:
    mine = cs.init("mine", "a", redis_url=redis_url)
    mine.log({"x": 1.0}, 0)
    mine.finish()
    other = cs.init("other", "b", redis_url=redis_url)
    other.log({"x": 1.0}, 0)
    other.finish()
    token, token_id = create_token(redis_client, "cs:", "read", "mine")
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=secured.url, timeout=10, headers=auth) as client:
        runs = client.get("/api/runs").json()["runs"]
        assert [r["run_id"] for r in runs] == [mine.id]
        assert client.get(f"/api/runs/{other.id}").status_code == 403
        assert client.get(f"/api/runs/{mine.id}/scalars").status_code == 200
        assert client.get("/api/runs", params={"project": "other"}).status_code == 403
        from server.auth import revoke_token

        assert revoke_token(redis_client, "cs:", token_id)
        assert client.get("/api/runs").status_code == 401


def test_admin_deletes_a_run(
    secured: LiveServer, redis_url: str, redis_client: redis.Redis
) -> None:
    run = cs.init("p", "doomed", redis_url=redis_url)
    run.log({"x": 1.0}, 0)
    run.finish()
    admin, _ = create_token(redis_client, "cs:", "admin", "*")
    with httpx.Client(
        base_url=secured.url, timeout=10, headers={"Authorization": f"Bearer {admin}"}
    ) as c:
        assert c.delete(f"/api/runs/{run.id}").json() == {"deleted": run.id}
        assert c.get(f"/api/runs/{run.id}").status_code == 404
        assert c.get("/api/runs").json()["runs"] == []
    assert redis_client.keys(f"cs:run:{{{run.id}}}:*") == []


def test_token_cli_creates_lists_and_revokes(redis_url: str, tmp_path: Path) -> None:
    env = {"CHANNELSCOPE_REDIS_URL": redis_url, "CHANNELSCOPE_HOME": str(tmp_path), "PATH": ""}
    cmd = [sys.executable, "-m", "server.cli", "token"]
    out = subprocess.run([*cmd, "create", "--project", "p", "--role", "write"], env=env,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    token = out.strip().splitlines()[-1]
    assert token.startswith("cs_")
    listed = subprocess.run(
        [*cmd, "list"], env=env, capture_output=True, text=True, check=True
    ).stdout
    token_id = listed.split()[0]
    assert "write" in listed
    assert token not in listed
    subprocess.run([*cmd, "revoke", token_id], env=env, check=True, capture_output=True)
    assert subprocess.run([*cmd, "list"], env=env, capture_output=True, text=True).stdout == ""
