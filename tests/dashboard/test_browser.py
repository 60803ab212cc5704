from __future__ import annotations

import threading
import time

import torch
from torch import nn

import monitor_agent as cs
from tests.conftest import LiveServer
from tests.dashboard.browser import browser_page, screenshot


def points_js(graph: str) -> str:
    return f"""() => {{
  const el = document.querySelector('#{graph} .js-plotly-plot');
  return el && el.data && el.data[0] ? el.data[0].x.length : 0;
}}"""


POINTS_JS = points_js("loss-graph")


def test_runs_page_to_live_run_page(live_server: LiveServer, redis_url: str) -> None:
    run = cs.init("browser", "live-run", config={"lr": 0.01}, redis_url=redis_url)
    stop = threading.Event()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run.watch(model, opt, batch_size=32, dataset_size=256, noise="per_example", emit_every=5)
    x, y = torch.randn(256, 10), torch.randint(0, 3, (256,))

    def write() -> None:
        step = 0
        while not stop.is_set() and step < 3000:
            idx = torch.randint(0, 256, (32,))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.log({"train/loss": loss.item()}, step=step)
            step += 1
            # ~40 steps/s: the plot stays under its max_points cap while the test watches
            # it grow, however slowly the page comes up.
            time.sleep(0.025)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        with browser_page() as (page, errors):
            page.goto(live_server.url + "/")
            link = page.get_by_role("link", name="live-run")
            link.wait_for(timeout=15_000)
            screenshot(page, "runs-page")
            link.click()
            page.wait_for_url(f"**/runs/{run.id}")
            page.wait_for_function(f"({POINTS_JS})() > 0", timeout=15_000)
            first = page.evaluate(POINTS_JS)
            page.wait_for_function(f"({POINTS_JS})() > {first}", timeout=15_000)
            second = page.evaluate(POINTS_JS)
            page.wait_for_function(f"({points_js('signal-graph')})() > 0", timeout=15_000)
            page.wait_for_function(f"({points_js('heatmap-graph')})() > 1", timeout=15_000)
            step_text = page.inner_text("#run-step")
            screenshot(page, "run-page")
            assert second > first > 0
            assert int(step_text) > 0
            assert page.inner_text("#run-status") == "running"
            assert errors == []
    finally:
        stop.set()
        writer.join()
        run.finish()


def test_sign_in_with_a_token_cookie(
    redis_url: str, redis_client: object, tmp_path: object
) -> None:
    from pathlib import Path

    import redis

    from server.auth import create_token
    from server.embedded_redis import free_port
    from server.settings import Settings

    assert isinstance(redis_client, redis.Redis)
    assert isinstance(tmp_path, Path)
    server = LiveServer(Settings(redis_url=redis_url, port=free_port(), home=tmp_path, auth="on"))
    server.start()
    run = cs.init("secure", "signed-in-run", redis_url=redis_url)
    run.log({"train/loss": 1.0}, 0)
    run.finish()
    token, _ = create_token(redis_client, "cs:", "read", "secure")
    try:
        with browser_page() as (page, errors):
            page.goto(server.url + "/")
            page.wait_for_url("**/signin")
            page.fill("#token", "cs_wrong")
            page.click("button[type=submit]")
            assert "Unknown or revoked token" in page.content()
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.get_by_role("link", name="signed-in-run").wait_for(timeout=15_000)
            assert token not in page.url
            cookies = page.context.cookies()
            cookie = next(c for c in cookies if c["name"] == "cs_token")
            assert cookie["httpOnly"]
            screenshot(page, "signed-in-runs-page")
            assert [e for e in errors if "401" not in e] == []
    finally:
        server.stop()
