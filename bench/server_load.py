"""Server load: ingest rate, live-push latency, and long-run reads, against a real server
process and real Redis, with simulated agents in separate processes. Run:

    .venv/bin/python bench/server_load.py [--runs 100] [--rate 10] [--seconds 20]

Results go to bench/results/server_load.md (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import monitor_agent as cs
from monitor_agent import wire
from server.embedded_redis import EmbeddedRedis, free_port


def _agent(
    redis_url: str, runs: int, rate: float, seconds: float, offset: int, q: mp.Queue
) -> None:
    """One process simulating ``runs`` agents, each logging ``rate`` records a second."""
    handles = [cs.init("load", f"agent-{offset + i}", redis_url=redis_url) for i in range(runs)]
    q.put([h.id for h in handles])
    start = time.time()
    step = 0
    while time.time() - start < seconds:
        tick = time.time()
        for h in handles:
            h.log({"train/loss": 1.0 / (step + 1), "lr": 1e-3}, step)
        step += 1
        time.sleep(max(0.0, 1.0 / rate - (time.time() - tick)))
    for h in handles:
        h.finish()


def _flood(redis_url: str, run_ids: list[str], records: int) -> None:
    """Write records straight into the run streams as fast as Redis takes them."""
    client = redis.Redis.from_url(redis_url)
    keys = wire.Keys()
    pipe = client.pipeline(transaction=False)
    for i in range(records):
        run_id = run_ids[i % len(run_ids)]
        rec = {"step": i // len(run_ids), "t": time.time(), "s": {"train/loss": 1.0, "lr": 1e-3}}
        pipe.xadd(keys.stream(run_id, "scalars"), wire.encode("scalars", rec))
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    client.close()


def _server(redis_url: str, port: int, home: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CHANNELSCOPE_REDIS_URL": redis_url, "CHANNELSCOPE_HOME": home,
           "CHANNELSCOPE_DASHBOARD": "false", "CHANNELSCOPE_POLL_INTERVAL_S": "0.05"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


async def _sse_latencies(base: str, run_ids: list[str], seconds: float) -> list[float]:
    latencies: list[float] = []

    async def follow(client: httpx.AsyncClient, run_id: str) -> None:
        async with client.stream("GET", f"{base}/api/runs/{run_id}/live") as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    body = json.loads(line[6:])
                    if body.get("kind") == "scalars":
                        latencies.append(time.time() - body["t"])

    async with httpx.AsyncClient(
        timeout=None, limits=httpx.Limits(max_connections=len(run_ids) + 10)
    ) as client:
        tasks = [asyncio.create_task(follow(client, r)) for r in run_ids]
        await asyncio.sleep(seconds)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--flood", type=int, default=200_000)
    parser.add_argument("--long-steps", type=int, default=1_000_000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "server_load.md"))
    args = parser.parse_args()
    home = tempfile.mkdtemp()
    rds = EmbeddedRedis(Path(tempfile.mkdtemp()), appendonly=False).start()
    port = free_port()
    server = _server(rds.url, port, home)
    base = f"http://127.0.0.1:{port}"
    results: dict[str, float] = {}
    try:
        # 1. live push: 100 runs x 10 records/s from 4 agent processes, one SSE client per run
        q: mp.Queue = mp.Queue()
        procs = [
            mp.Process(
                target=_agent, args=(rds.url, args.runs // 4, args.rate, args.seconds, i * 1000, q)
            )
            for i in range(4)
        ]
        for p in procs:
            p.start()
        run_ids = [r for _ in procs for r in q.get(timeout=60)]
        lat = asyncio.run(_sse_latencies(base, run_ids, args.seconds - 2))
        for p in procs:
            p.join()
        lat.sort()
        results["sse_p50_s"] = lat[len(lat) // 2]
        results["sse_p95_s"] = lat[int(0.95 * len(lat))]
        results["sse_events"] = float(len(lat))
        # 2. ingest: records written as fast as Redis takes them; the reader's rate
        before = httpx.get(f"{base}/readyz").json()["records_read"]
        t0 = time.perf_counter()
        writers = [
            mp.Process(target=_flood, args=(rds.url, run_ids, args.flood // 4)) for _ in range(4)
        ]
        for w in writers:
            w.start()
        target = before + args.flood
        while httpx.get(f"{base}/readyz").json()["records_read"] < target:
            time.sleep(0.05)
            if time.perf_counter() - t0 > 600:
                break
        for w in writers:
            w.join()
        results["ingest_records_per_s"] = args.flood / (time.perf_counter() - t0)
        # 3. a 10^6-step run read with max_points=2000
        long = cs.init("load", "long", redis_url=rds.url)
        long.finish()
        _flood(rds.url, [long.id], args.long_steps)
        client = redis.Redis.from_url(rds.url)
        state = long.keys.run_state(long.id, "rollup:state")
        t_roll = time.perf_counter()
        while int(client.hget(state, "last_step") or 0) < args.long_steps - 1:
            time.sleep(0.2)
            if time.perf_counter() - t_roll > 900:
                break
        results["rollup_catch_up_s"] = time.perf_counter() - t_roll
        reads = []
        for _ in range(7):
            t = time.perf_counter()
            body = httpx.get(
                f"{base}/api/runs/{long.id}/scalars", params={"max_points": 2000}, timeout=120
            ).json()
            reads.append(time.perf_counter() - t)
        results["long_read_s"] = statistics.median(reads)
        results["long_read_points"] = float(len(body["series"]["train/loss"]["step"]))
        results["long_read_source_rollup"] = float(body.get("source") == "rollup")
    finally:
        server.terminate()
        server.wait(10)
        rds.stop()
    lines = [
        "# Server load",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        "One server process (uvicorn, no dashboard) and one Redis on this machine; agents in 4 "
        "separate processes; SSE clients in the benchmark process.",
        "",
        "| measure | value | budget |",
        "|---|---|---|",
        f"| sustained ingest (records read and validated per second) | {results['ingest_records_per_s']:.0f} | ≥ 20,000 |",
        f"| XADD → SSE client latency, p50 / p95 ({args.runs} runs × {args.rate:g} records/s, {int(results['sse_events'])} events) | {results['sse_p50_s'] * 1e3:.0f} ms / {results['sse_p95_s'] * 1e3:.0f} ms | p95 ≤ 1.5 s |",
        f"| read of a {args.long_steps:,}-step run, max_points=2000 (median of 7; {int(results['long_read_points'])} points, from rollups: {bool(results['long_read_source_rollup'])}) | {results['long_read_s'] * 1e3:.0f} ms | ≤ 300 ms |",
        f"| rollups catching up with {args.long_steps:,} records written at once | {results['rollup_catch_up_s']:.0f} s | — |",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
