from __future__ import annotations

import math
import threading
import time

import monitor_agent as cs
from tests.conftest import LiveServer
from tests.dashboard.browser import browser_page, screenshot

POINTS_JS = """() => {
  const el = document.querySelector('#loss-graph .js-plotly-plot');
  return el && el.data && el.data[0] ? el.data[0].x.length : 0;
}"""


def test_runs_page_to_live_run_page(live_server: LiveServer, redis_url: str) -> None:
    run = cs.init("browser", "live-run", config={"lr": 0.01}, redis_url=redis_url)
    stop = threading.Event()

    def write() -> None:
        step = 0
        while not stop.is_set() and step < 2000:
            run.log({"train/loss": math.exp(-step / 200) + 0.01}, step=step)
            step += 1
            time.sleep(0.01)

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
