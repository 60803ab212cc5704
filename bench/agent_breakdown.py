"""Where the agent's equal-cadence overhead goes: the streaming statistic computed and
published every step, taken apart in one interleaved run.

Configurations, each on its own copy of the model (same seed and batch):
* no monitoring, twice (the second is the A/A noise floor);
* the streaming update alone (the per-step gather and the two running moments; statistics
  emitted only at step 0);
* the update plus every emitted-step statistic, computed and moved to the host but not
  published (the monitor's publish step replaced by a no-op);
* everything: computed and published every step through the sender thread to a real Redis.

Each part's cost is the difference of medians of per-round ratios to the plain step, in
milliseconds of that step. Run:

    .venv/bin/python bench/agent_breakdown.py [--rounds 15] [--steps 30] [--only MLP]

Results go to bench/results/agent_breakdown.md (or --out).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import monitor_agent as cs
from bench.peers import plain_step
from bench.workloads import WORKLOADS, Workload
from server.embedded_redis import EmbeddedRedis

STREAMING = {"noise": "streaming", "budget": None}
PARTS: dict[str, dict[str, Any] | None] = {
    "no monitoring": None,
    "no monitoring (A/A)": None,
    "update only": {**STREAMING, "emit_every": 10**9},
    "update + statistics": {**STREAMING, "emit_every": 1},
    "update + statistics + publish": {**STREAMING, "emit_every": 1},
}


def breakdown(w: Workload, rounds: int, steps: int, redis_url: str) -> dict[str, Any]:
    """Median ratio to the plain step of each configuration, and the plain step (s)."""
    torch.manual_seed(0)
    base = w.make()
    x, y = w.batch(torch.device("cpu"))
    setups: dict[str, Callable[[], None]] = {}
    runs = []
    for name, kwargs in PARTS.items():
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        if kwargs is not None:
            run = cs.init("bench", f"{w.name} {name}", redis_url=redis_url)
            run.watch(model, opt, batch_size=w.batch_size, dataset_size=50_000, **kwargs)
            if name == "update + statistics":
                # Everything up to the host transfer, nothing handed to the sender.
                run._monitor._publish = lambda *args: None
            runs.append(run)
        setups[name] = plain_step(model, opt, x, y)

    def train(name: str, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            setups[name]()
        return (time.perf_counter() - t0) / n

    for name in setups:
        train(name, 100)
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(rounds):
        for name in setups:
            times[name].append(train(name, steps))
    for run in runs:
        run.finish()
    plain = times["no monitoring"]
    ratios = {
        name: statistics.median(t / b for t, b in zip(ts, plain, strict=True))
        for name, ts in times.items()
    }
    return {"step_s": statistics.median(plain), "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="784-512", help="substring of the workloads to run")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "agent_breakdown.md")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    redis = EmbeddedRedis(Path(tempfile.mkdtemp()), appendonly=False).start()
    results = []
    try:
        for w in WORKLOADS:
            if args.only in w.name and "transformer" not in w.name:
                results.append((w, breakdown(w, args.rounds, args.steps, redis.url)))
                print(w.name, results[-1][1], flush=True)
    finally:
        redis.stop()
    lines = [
        "# Agent overhead at equal cadence, by part",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"CPU, torch threads: {args.threads}, torch {torch.__version__}, {args.rounds} "
        "interleaved rounds of "
        f"{args.steps} steps; Adam; the streaming estimator, no budget; a real local Redis.",
        "",
        "Ratios are medians over rounds of (step time) / (plain step time); a part's cost is "
        "the difference between consecutive rows, in ms of the plain step.",
        "",
        "| workload | plain step (ms) | configuration | ratio | added (ms) | this part (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for w, res in results:
        step_ms = res["step_s"] * 1e3
        previous = 0.0
        for name, ratio in res["ratios"].items():
            added = (ratio - 1) * step_ms
            part = "" if name.startswith("no monitoring") else f"{added - previous:+.2f}"
            if not name.startswith("no monitoring"):
                previous = added
            lines.append(
                f"| {w.name} | {step_ms:.2f} | {name} | {ratio:.3f} | {added:+.2f} | {part} |"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
