"""Every page in a real headless Chromium: loads without console errors, shows its
panels with data from real runs, shows empty states for missing series."""

from __future__ import annotations

import random
import re

import torch
from torch import nn

import monitor_agent as cs
from tests.conftest import LiveServer
from tests.dashboard.browser import browser_page, screenshot


def _watched_run(redis_url: str, name: str, steps: int = 120) -> cs.Run:
    torch.manual_seed(random.randrange(10**6))
    model = nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 3))
    x, y = torch.randn(96, 10), torch.randint(0, 3, (96,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with cs.init("pages", name, config={"lr": 3e-3}, redis_url=redis_url) as run:
        run.watch(model, opt, batch_size=16, dataset_size=96, noise="per_example", emit_every=5,
                  hist_every=20, probe=(x[:12], y[:12]), spectrum_every=20, k=4)  # fmt: skip
        for step in range(steps):
            idx = torch.randint(0, 96, (16,))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.log({"train/loss": loss.item()}, step)
    return run


def _points(graph: str) -> str:
    return f"""() => {{
      const el = document.querySelector('#{graph} .js-plotly-plot');
      return el && el.data ? el.data.reduce((n, t) => n + (t.y ? t.y.length : 0), 0) : 0;
    }}"""


def test_run_page_panels_fill_and_missing_series_show_empty_states(
    live_server: LiveServer, redis_url: str
) -> None:
    full = _watched_run(redis_url, "full")
    bare = cs.init("pages", "bare", redis_url=redis_url)
    bare.log({"train/loss": 1.0}, 0)
    bare.finish()
    with browser_page() as (page, errors):
        # Record layout shifts from the first paint on (Chromium's Layout Instability API).
        page.add_init_script(
            "window.__shift = 0; new PerformanceObserver(l => l.getEntries().forEach(e => {"
            " if (!e.hadRecentInput) window.__shift += e.value; }))"
            ".observe({type: 'layout-shift', buffered: true});"
        )
        page.goto(f"{live_server.url}/runs/{full.id}")
        for graph in (
            "loss-graph",
            "signal-graph",
            "mem-graph",
            "noise-graph",
            "heatmap-graph",
            "spectrum-graph",
        ):
            page.wait_for_function(f"({_points(graph)})() > 1", timeout=20_000)
        page.wait_for_function(
            "document.querySelector('#hist-graph .js-plotly-plot').data.length > 0"
        )
        # the slider spans the histograms kept in the browser (hist_every=20 of 120 steps)
        page.wait_for_function(
            "document.querySelectorAll('#hist-slider .rc-slider-mark-text, "
            "#hist-slider .dash-slider-mark').length > 1",
            timeout=20_000,
        )
        page.wait_for_selector("#events-table")
        assert "run_finished" in page.inner_text("#events-list")
        # Panels keep their place as data arrives: cumulative layout shift stays below
        # 0.1, the "good" threshold of Web Vitals.
        assert page.evaluate("window.__shift") < 0.1
        screenshot(page, "run-page-full")
        page.set_viewport_size({"width": 3840, "height": 2160})
        screenshot(page, "run-page-4k")
        page.set_viewport_size({"width": 1366, "height": 768})
        page.goto(f"{live_server.url}/runs/{bare.id}")
        page.wait_for_function(f"({_points('loss-graph')})() > 0", timeout=20_000)
        page.wait_for_selector("text=No gradient statistics yet")
        page.wait_for_selector("text=No spectrum yet")
        screenshot(page, "run-page-empty")
        page.goto(f"{live_server.url}/runs/doesnotexist")
        page.wait_for_selector("text=not found")
        assert errors == []


def test_browser_side_histogram_functions() -> None:
    """The run page keeps its histograms in the browser: append-and-cap, slider and pick."""
    from dashboard.run_page import PICK_JS, SLIDER_JS, cap_hist_js

    n = random.randrange(201, 2000)
    entries = [{"step": i} for i in range(n)]
    with browser_page() as (page, errors):
        capped = page.evaluate(
            f"([a, b]) => ({cap_hist_js(200)})(a, b)", [entries[-7:], entries[:-7]]
        )
        steps = [e["step"] for e in capped]
        assert 100 <= len(capped) <= 200
        assert steps[-1] == n - 1 and steps[0] == 0 and steps == sorted(steps)
        short = page.evaluate(
            f"([a, b]) => ({cap_hist_js(200)})(a, b)", [entries[40:50], entries[:40]]
        )
        assert short == entries[:50]
        assert page.evaluate(f"(a) => ({cap_hist_js(200)})(a, null)", entries[:3]) == entries[:3]
        # follows the newest entry, unless moved back in time
        last, value, marks = page.evaluate(f"(h) => ({SLIDER_JS})(h, 4, 4)", entries[:12])
        assert (last, value) == (11, 11) and marks["0"] == "0"
        assert page.evaluate(f"(h) => ({SLIDER_JS})(h, 2, 4)", entries[:12])[1] == 2
        assert page.evaluate(f"(h) => ({SLIDER_JS})(h, null, 0)", [])[:2] == [0, 0]
        assert page.evaluate(f"(h) => ({PICK_JS})(3, h)", entries[:12]) == {"step": 3}
        assert page.evaluate(f"(h) => ({PICK_JS})(30, h)", entries[:12]) == {"step": 11}
        assert page.evaluate(f"() => ({PICK_JS})(0, [])") is None
    assert errors == []


def test_runs_compare_and_rules_pages(live_server: LiveServer, redis_url: str) -> None:
    a = _watched_run(redis_url, "alpha", 60)
    b = _watched_run(redis_url, "beta", 60)
    with browser_page() as (page, errors):
        page.goto(live_server.url + "/")
        page.wait_for_selector("#runs-table")
        assert page.locator(".run-row").count() == 2
        page.fill("#runs-q", "alpha")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelectorAll('.run-row').length === 1")
        screenshot(page, "runs-page-filtered")

        page.goto(live_server.url + "/compare")
        for run in (a, b):
            if page.get_by_role("option", name=re.compile(run.id)).count() == 0:
                page.click("#cmp-runs")
            page.get_by_role("option", name=re.compile(run.id)).click()
        page.keyboard.press("Escape")
        two_traces = (
            "document.querySelector('#cmp-graph .js-plotly-plot').data"
            ".filter(t => t.x && t.x.length > 10).length === 2"
        )
        page.wait_for_function(two_traces, timeout=20_000)
        screenshot(page, "compare-page")

        page.goto(live_server.url + "/rules")
        page.fill("#rules-project", "pages")
        page.keyboard.press("Enter")
        page.wait_for_selector("text=No rules for this project yet.")
        page.fill("#rule-series", "train/loss")
        page.fill("#rule-value", "5")
        page.click("#rule-save")
        page.wait_for_selector("#rules-table")
        screenshot(page, "rules-page")
        page.click("text=delete")
        page.wait_for_selector("text=No rules for this project yet.")
        assert errors == []


def test_theme_toggle_cycles_auto_light_dark_and_is_remembered(live_server: LiveServer) -> None:
    background = "getComputedStyle(document.body).backgroundColor"
    theme = "document.documentElement.dataset.theme || 'auto'"
    with browser_page() as (page, errors):
        page.goto(live_server.url + "/")
        page.wait_for_selector("text=theme: auto")
        page.click("#theme-toggle")
        page.wait_for_selector("text=theme: light")
        assert page.evaluate(theme) == "light"
        assert page.evaluate(background) == "rgb(248, 250, 252)"
        page.click("#theme-toggle")
        page.wait_for_selector("text=theme: dark")
        assert page.evaluate(background) == "rgb(11, 17, 32)"
        screenshot(page, "runs-page-dark")
        page.reload()  # the choice is kept in the browser's local storage
        page.wait_for_selector("text=theme: dark")
        assert page.evaluate(theme) == "dark"
        page.click("#theme-toggle")
        page.wait_for_selector("text=theme: auto")
        assert page.evaluate(theme) == "auto"
        assert errors == []
