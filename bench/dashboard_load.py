"""Dashboard load: time from navigation to every panel drawn for a run of 10⁶ steps with
48 layers, and the browser's JS heap over a stretch of live updates. Run:

    .venv/bin/python bench/dashboard_load.py [--steps 1000000] [--soak-minutes 30]

Results go to bench/results/dashboard_load.md (or --out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import monitor_agent as cs
from monitor_agent import wire
from server.embedded_redis import EmbeddedRedis, free_port
from tests.dashboard.browser import browser_page

LAYERS = [f"blocks.{i // 4}.{['attn', 'mlp', 'ln1', 'ln2'][i % 4]}.weight" for i in range(48)]
PANELS = (
    "loss-graph", "signal-graph", "mem-graph", "noise-graph", "heatmap-graph", "spectrum-graph",
)  # fmt: skip
EDGES = [x / 2 for x in range(-16, 9)]
COUNTS = [10 * (i % 7) for i in range(len(EDGES) - 1)]
DRAWN_JS = """(ids) => ids.every(id => {
  const el = document.querySelector('#' + id + ' .js-plotly-plot');
  return el && el.data && el.data.some(t => (t.y || []).length > 1);
})"""


def fill(redis_url: str, run: cs.Run, steps: int) -> None:
    """Write a long run's history straight into Redis (scalars every step, layers every
    100 steps)."""
    client = redis.Redis.from_url(redis_url)
    keys = run.keys
    pipe = client.pipeline(transaction=False)
    t0 = time.time() - steps * 0.01
    for step in range(steps):
        rec = {"step": step, "t": t0 + step * 0.01,
               "s": {"train/loss": 2.0 / (1 + step / 1e4), "signal/occupancy": 0.5,
                     "signal/occupancy_soft": 0.4, "memorization/score": 0.1,
                     "signal/noise_scale": 1.5, "signal/gsnr_median": 0.2}}  # fmt: skip
        pipe.xadd(keys.stream(run.id, "scalars"), wire.encode("scalars", rec), id=f"{step + 1}-0")
        if step % 100 == 0:
            lrec = {"step": step, "t": rec["t"], "l": {"occupancy": [0.5] * len(LAYERS)}}
            pipe.xadd(
                keys.stream(run.id, "layers"), wire.encode("layers", lrec), id=f"{step + 1}-0"
            )
        if step % 1000 == 0:  # histograms and spectra, as a watched run with a probe has
            hrec = {"step": step, "t": rec["t"], "edges": EDGES, "counts": [COUNTS] * len(LAYERS)}
            pipe.xadd(keys.stream(run.id, "hist"), wire.encode("hist", hrec), id=f"{step + 1}-0")
        if step % 5000 == 0:
            srec = {"step": step, "t": rec["t"], "w_eigs": [0.5 / (k + 1) for k in range(16)],
                    "kernel_eigs": [1.0 / (k + 1) for k in range(16)], "method": "exact",
                    "probe_size": 64}  # fmt: skip
            pipe.xadd(
                keys.stream(run.id, "spectrum"), wire.encode("spectrum", srec), id=f"{step + 1}-0"
            )
        if step % 2000 == 1999:
            pipe.execute()
    pipe.execute()
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--soak-minutes", type=float, default=30.0)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "dashboard_load.md")
    )
    args = parser.parse_args()
    rds = EmbeddedRedis(Path(tempfile.mkdtemp()), appendonly=False).start()
    port = free_port()
    env = {**os.environ, "CHANNELSCOPE_REDIS_URL": rds.url, "CHANNELSCOPE_HOME": tempfile.mkdtemp()}
    server = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(f"{base}/healthz", timeout=0.5)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    try:
        long = cs.init("load", "long", redis_url=rds.url)
        long.update_meta({"layers": LAYERS})
        long.finish()
        fill(rds.url, long, args.steps)
        client = redis.Redis.from_url(rds.url)
        while (
            int(client.hget(long.keys.run_state(long.id, "rollup:state"), "last_step") or 0)
            < args.steps - 1
        ):
            time.sleep(0.5)
        loads = []
        with browser_page() as (page, _errors):
            for _ in range(args.loads):
                t0 = time.perf_counter()
                page.goto(f"{base}/runs/{long.id}")
                page.wait_for_function(DRAWN_JS, arg=list(PANELS), timeout=120_000)
                loads.append(time.perf_counter() - t0)
            # live soak: a run written at 10 steps/s while the page follows it
            live = cs.init("load", "live", redis_url=rds.url)
            stop = threading.Event()

            def write() -> None:
                step = 0
                while not stop.is_set():
                    live.log({"train/loss": 1.0 / (step + 1), "signal/occupancy": 0.5}, step)
                    step += 1
                    time.sleep(0.1)

            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            page.goto(f"{base}/runs/{live.id}")
            page.wait_for_function(DRAWN_JS, arg=["loss-graph"], timeout=60_000)
            # Live heap only: a garbage collection (through the DevTools protocol) before
            # each sample, or the samples follow the collector's timing, not a leak.
            cdp = page.context.new_cdp_session(page)
            heap = []
            end = time.time() + args.soak_minutes * 60
            while time.time() < end:
                page.wait_for_timeout(10_000)
                cdp.send("HeapProfiler.collectGarbage")
                heap.append(page.evaluate("() => performance.memory.usedJSHeapSize") / 2**20)
            stop.set()
            writer.join()
            live.finish()
    finally:
        server.terminate()
        server.wait(10)
        rds.stop()
    first = statistics.median(heap[: max(1, len(heap) // 5)])
    last = statistics.median(heap[-max(1, len(heap) // 5) :])
    lines = [
        "# Dashboard load",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        "Headless Debian Chromium through Playwright, 1366×768, against one server process.",
        "",
        "| measure | value | budget |",
        "|---|---|---|",
        f"| navigation → all panels drawn, run of {args.steps:,} steps × {len(LAYERS)} layers (median of {args.loads}) | {statistics.median(loads):.2f} s (min {min(loads):.2f}, max {max(loads):.2f}) | ≤ 2 s |",
        f"| JS heap after garbage collection over {args.soak_minutes:g} min of live updates: first fifth → last fifth (median MiB) | {first:.1f} → {last:.1f} ({100 * (last / first - 1):+.1f} %) | within 10 % |",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
