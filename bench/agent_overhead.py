"""Agent overhead: training step time with and without channelscope, interleaved.

Every configuration trains its own copy of the model; rounds cycle through the
configurations so machine noise hits all of them alike, and the report gives the median
over rounds of (step time with the agent) / (step time without). Run:

    .venv/bin/python bench/agent_overhead.py [--rounds 7] [--steps 30] [--device cpu]

Results go to bench/results/agent_overhead.md (or --out).
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
from bench.peers import PEERS, Unsupported, describe, plain_step
from bench.workloads import WORKLOADS, Workload
from server.embedded_redis import EmbeddedRedis

CONFIGS: dict[str, dict[str, Any] | None] = {
    "no monitoring": None,
    "channelscope default": {},
    # Exact columns run at their stated cadence: no budget thinning.
    "per-example every 50": {"noise": "per_example", "per_example_every": 50, "budget": None},
    "per-example every step": {
        "noise": "per_example",
        "per_example_every": 1,
        "emit_every": 1,
        "budget": None,
    },
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_workload(
    w: Workload,
    rounds: int,
    steps: int,
    device: torch.device,
    redis_url: str,
    warmup: int = 100,
    with_peers: bool = False,
) -> dict[str, Any]:
    torch.manual_seed(0)
    base = w.make().to(device)
    x, y = w.batch(device)
    setups: dict[str, tuple[Callable[[], None], Any]] = {}
    for name, kwargs in CONFIGS.items():
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        run = None
        if kwargs is not None:
            run = cs.init("bench", f"{w.name} {name}", redis_url=redis_url)
            run.watch(model, opt, batch_size=w.batch_size, dataset_size=50_000, **kwargs)
        setups[name] = (plain_step(model, opt, x, y), run)
    skipped: dict[str, str] = {}
    for name, make in PEERS.items() if with_peers else []:
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        try:
            setups[name] = (make(model, opt, x, y), None)
        except Unsupported as exc:
            skipped[name] = str(exc)

    def train(name: str, n: int) -> float:
        step = setups[name][0]
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        _sync(device)
        return (time.perf_counter() - t0) / n

    # Warm-up: allocator, Adam state, and the agent settling its schedule to its budget
    # (it doubles its stride at each emission while over budget), as in a long run.
    for name in list(setups):
        # Peers have no schedule to settle (and some are two orders of magnitude slower).
        try:
            train(name, warmup if name in CONFIGS else 3)
        except Exception as exc:  # a peer failing on this model is reported, not fatal
            if name in CONFIGS:
                raise
            skipped[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
            del setups[name]
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(rounds):
        for name in setups:
            # Per-step times are compared, so the slow peers (Cockpit runs two orders of
            # magnitude slower) may take fewer steps a round.
            times[name].append(train(name, steps if name in CONFIGS else max(2, steps // 10)))
    ratios = {}
    for name in setups:
        per_round = [t / b for t, b in zip(times[name], times["no monitoring"], strict=True)]
        ratios[name] = statistics.median(per_round)
    n_params = sum(p.numel() for p in base.parameters())
    extra = {}
    for name, (_, run) in setups.items():
        if run is not None:
            mon = run._monitor
            extra[name] = mon.state_bytes() / (4 * n_params)
            run.finish()
    return {
        "step_ms": statistics.median(times["no monitoring"]) * 1e3,
        "ratios": ratios,
        "extra_buffers": extra,
        "params": n_params,
        "skipped": skipped,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="substring of the workloads to run")
    parser.add_argument(
        "--peers", action="store_true", help="add the peer columns (make bench-peers)"
    )
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "agent_overhead.md")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    redis = EmbeddedRedis(Path(tempfile.mkdtemp()), appendonly=False).start()
    rows = []
    try:
        for w in WORKLOADS:
            if args.only and args.only not in w.name:
                continue
            steps = max(3, args.steps // 4) if "transformer" in w.name else args.steps
            warmup = 20 if "transformer" in w.name else 100
            res = bench_workload(w, args.rounds, steps, device, redis.url, warmup, args.peers)
            rows.append((w, res))
            print(
                w.name,
                f"{res['step_ms']:.2f} ms/step",
                {k: round(v, 3) for k, v in res["ratios"].items()},
                flush=True,
            )
    finally:
        redis.stop()
    columns = [c for c in CONFIGS if c != "no monitoring"] + (list(PEERS) if args.peers else [])
    lines = [
        "# Agent overhead",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"Device: {args.device}, torch threads: {args.threads}, torch {torch.__version__}, "
        f"{args.rounds} interleaved rounds; Adam; agent writing to a real local Redis.",
        "",
        "Cells are the median over rounds of step time with the agent / step time without "
        "(1.000 = no overhead). 'state' is the agent's per-step state as a fraction of one "
        "parameter-sized float32 buffer.",
        "",
        "| workload | step (ms) | " + " | ".join(columns) + " | state (default) |",
        "|---|---|" + "---|" * len(columns) + "---|",
    ]
    for w, res in rows:
        cells = [f"{res['ratios'][c]:.3f}" if c in res["ratios"] else "n/a" for c in columns]
        lines.append(
            f"| {w.name} | {res['step_ms']:.2f} | "
            + " | ".join(cells)
            + f" | {res['extra_buffers']['channelscope default']:.3f} |"
        )
    notes = sorted({f"{k}: {v}" for _, r in rows for k, v in r["skipped"].items()})
    lines += [
        "",
        "Peers: "
        + (describe(None) if args.peers else "not run (make bench-peers runs them)")
        + ".",
    ]
    lines += [f"* n/a — {n}" for n in notes]
    lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
