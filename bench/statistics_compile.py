"""Would a fused (compiled) statistics pass pay? The emitted-step statistics
(``signal_stats.layer_statistics``) in torch ops, eager, against ``torch.compile`` of the
same function and against the fused CPU kernels (numba, ``monitor_agent.cpu_statistics``),
in one interleaved run on the inputs the agent really passes it.

The inputs are a snapshot of one emitted step of the streaming estimator on the worst-case
benchmark model (MLP 784-512-512-10, b=128, Adam), where the statistics are the largest
part of the equal-cadence overhead (0.70 of 1.77 ms, bench/results/agent_breakdown.md).
Variants:
* eager: the torch path, as the agent calls it by default;
* compiled: ``torch.compile(layer_statistics)`` (Inductor; on CPU it needs a C++ compiler);
* compiled, medians eager: the same with the per-layer GSNR medians kept out of the graph;
* fused CPU kernels: the path of ``watch(cpu_kernels=True)``; its first call compiles them
  (numba, with an empty cache).

Each round times every variant over ``--calls`` calls (median per call); the ratios are
medians over rounds of variant / eager. Compile time (first call) is reported apart. Run:

    .venv/bin/python bench/statistics_compile.py [--rounds 9] [--calls 200]

Results go to bench/results/statistics_compile.md (or --out).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import monitor_agent as cs
from bench.workloads import WORKLOADS
from monitor_agent import signal_stats as st
from server.embedded_redis import EmbeddedRedis

WORKLOAD = "MLP 784-512-512-10, b=128"


def emitted_step_inputs(redis_url: str, steps: int = 20) -> tuple[Any, ...]:
    """layer_statistics' arguments at an emitted step after ``steps`` training steps."""
    w = next(x for x in WORKLOADS if x.name == WORKLOAD)
    torch.manual_seed(0)
    model = w.make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    run = cs.init("bench", "statistics compile", redis_url=redis_url)
    run.watch(model, opt, batch_size=w.batch_size, dataset_size=50_000, noise="streaming",
              emit_every=1, budget=None)  # fmt: skip
    monitor = run._monitor
    assert monitor is not None
    monitor.keep_snapshot = True
    x, y = w.batch(torch.device("cpu"))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    run.finish()
    snap = monitor.snapshot
    return (snap["g"], snap["s"], snap["m2"], snap["w"], snap["m2"],
            monitor.closed_run.clone(), monitor.bounds, w.batch_size, monitor.gate)  # fmt: skip


def fresh(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """The same arguments with a copy of closed_run (the one argument updated in place)."""
    return (*inputs[:5], inputs[5].clone(), *inputs[6:])


def per_call_us(
    fn: Callable[[], Any], calls: int, before: Callable[[], Any] | None = None
) -> float:
    """Median wall time of one call, µs, after a short warm-up; ``before`` (untimed) runs
    ahead of every timed call."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(calls):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "statistics_compile.md")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # A fresh compile cache: the first call is then what a new training process pays.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="numba-")
    warnings.filterwarnings("ignore", module="monitor_agent")
    redis = EmbeddedRedis(Path(tempfile.mkdtemp()), appendonly=False).start()
    try:
        inputs = emitted_step_inputs(redis.url)
    finally:
        redis.stop()
    torch_path = functools.partial(st.layer_statistics, fused=False)
    eager_fn = torch_path
    compiled_fn = torch.compile(torch_path, dynamic=False)
    # The medians kept out of the graph, in case they are what compiles badly.
    split_fn = _with_eager_medians(torch.compile(torch_path, dynamic=False))
    variants: dict[str, Callable[..., Any]] = {
        "eager": eager_fn,
        "compiled": compiled_fn,
        "compiled, medians eager": split_fn,
        "fused CPU kernels": functools.partial(st.layer_statistics, fused=True),
    }
    compile_s: dict[str, float] = {}
    reference = eager_fn(*fresh(inputs))
    max_diff: dict[str, float] = {}
    for name, fn in variants.items():
        # Each call advances closed_run in place: compare from the same starting state.
        t0 = time.perf_counter()
        out = fn(*fresh(inputs))
        compile_s[name] = time.perf_counter() - t0
        max_diff[name] = max(
            float((a - b).abs().max()) for a, b in zip(out, reference, strict=True)
        )
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(per_call_us(lambda fn=fn: fn(*inputs), args.calls))
    ratios = {
        name: statistics.median(t / e for t, e in zip(ts, times["eager"], strict=True))
        for name, ts in times.items()
    }
    n_coords = inputs[0].numel()
    lines = [
        "# Emitted-step statistics: eager against torch.compile and the fused CPU kernels",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"CPU, torch threads: {args.threads}, torch {torch.__version__}, {args.rounds} "
        f"interleaved rounds of {args.calls} calls; inputs: one emitted step of the "
        f"streaming estimator on {WORKLOAD} ({n_coords:,} sampled coordinates, "
        f"{len(inputs[6])} tensors).",
        "",
        "Per call: median over rounds of each round's median call. Ratio: median over rounds "
        "of variant / eager. First call: the first call's wall time, compilation included, "
        "with an empty compile cache. "
        "Max |Δ|: the largest difference from eager over every output.",
        "",
        "| variant | per call (µs) | ratio to eager | first call (s) | max abs diff |",
        "|---|---|---|---|---|",
    ]
    for name in variants:
        lines.append(
            f"| {name} | {statistics.median(times[name]):.0f} | {ratios[name]:.2f} | "
            f"{compile_s[name]:.2f} | {max_diff[name]:.1e} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


_eager_median = torch.compiler.disable(st._median_of)


def _with_eager_medians(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """``compiled`` called while the module's median is one Dynamo leaves out of the graph
    (its guards pick the entry compiled for that median)."""

    def call(*args: Any) -> Any:
        original = st._median_of
        st._median_of = _eager_median
        try:
            return compiled(*args)
        finally:
            st._median_of = original

    return call


if __name__ == "__main__":
    main()
