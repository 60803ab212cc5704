"""Why the agent's per-step work costs several times more inside a training step than in a
loop of its own: the same calls timed hot (back to back), right after a training step
(as the optimizer pre-hook runs them), and after 2 ms of sleep, in one interleaved run.

Calls, on the worst-case benchmark MLP (784-512-512-10, b=128, Adam, 26,931 sampled
coordinates):
* one torch op on the sampled vector (an in-place add);
* a numba call that does nothing (the fused kernels' floor per call);
* the fused gather of the sampled gradient (watch(cpu_kernels=True));
* the same gather of as many coordinates read contiguously from each tensor's start: the
  cache lines a sample of whole lines (blocks of adjacent coordinates) would touch, 16×
  fewer for float32, to size what such a sample could save;
* the gather with torch ops (slices and a cat, the default);
* the whole per-step update with torch ops and with the kernels (the monitor's hook on a
  step that emits nothing);
* the whole emitted step with the kernels (the monitor's hook at equal cadence:
  the gather, update and statistics in one kernel call, and publishing to Redis);
* an emitted step's two records (its layers and scalars, built in the call) passed to
  ``Run.emit_many``,
  encoded and queued for the sender at once (a run whose hold is off), and held (the
  run's default when records come within 50 ms of its last hand-off; one call in several
  then encodes and queues all that is held).

Each round times every call ``--calls`` times in each setting; cells are medians over
rounds of each round's median, µs. Run:

    .venv/bin/python bench/agent_cold_calls.py [--rounds 9] [--calls 100]

Results go to bench/results/agent_cold_calls.md (or --out).
"""

from __future__ import annotations

import argparse
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
from bench.statistics_compile import per_call_us
from bench.workloads import WORKLOADS
from monitor_agent import cpu_kernels
from monitor_agent import signal_stats as st
from server.embedded_redis import EmbeddedRedis

WORKLOAD = "MLP 784-512-512-10, b=128"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "agent_cold_calls.md")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="monitor_agent")
    assert cpu_kernels.load(wait=True), cpu_kernels.state()
    kernels: Any = cpu_kernels.loaded()
    w = next(x for x in WORKLOADS if x.name == WORKLOAD)
    redis = EmbeddedRedis(Path(tempfile.mkdtemp()), appendonly=False).start()
    try:
        torch.manual_seed(0)
        model = w.make()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x, y = w.batch(torch.device("cpu"))
        monitors, runs = {}, []
        for fused, emit_every in ((False, 10**9), (True, 10**9), (True, 1)):
            run = cs.init("bench", f"cold calls {fused} {emit_every}", redis_url=redis.url)
            runs.append(run)
            mon = run.watch(
                model, opt, batch_size=w.batch_size, dataset_size=50_000, noise="streaming",
                emit_every=emit_every, budget=None, cpu_kernels=fused,
            )  # fmt: skip
            mon._handle.remove()  # called by hand below, not by the optimizer
            monitors[(fused, emit_every)] = mon

        def train_step() -> None:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        for _ in range(20):
            train_step()
        plain = monitors[(False, 10**9)]
        fused_plan = monitors[(True, 10**9)]._fused_plan()  # the same model's layout and sample
        g = plain.workspace.get("g")
        contiguous_plan = st.fused_plan(
            plain.n_coords, plain.bounds, w.batch_size, plain.gate, plain.dtype,
            [None if sl is None else slice(0, None, 1) for sl in plain.idx],
        )  # fmt: skip
        scratch = g.numpy()[:1]
        queued_at_once = cs.init("bench", "cold calls, records at once", redis_url=redis.url)
        queued_at_once._hold_s = 0.0
        held = cs.init("bench", "cold calls, records held", redis_url=redis.url)
        runs += [queued_at_once, held]

        def records() -> list[tuple[str, dict[str, Any]]]:
            """An emitted step's layers and scalars records, built as the monitor builds
            them (7 fields of 6 layers, 25 scalars)."""
            t = time.time()
            layers = {f"field{i}": [0.1 * j for j in range(6)] for i in range(7)}
            scalars = {f"signal/x{i}": 0.5 + i for i in range(25)}
            return [
                ("layers", {"step": 1, "t": t, "l": layers}),
                ("scalars", {"step": 1, "t": t, "s": scalars}),
            ]

        calls: dict[str, Callable[[], Any]] = {
            "torch in-place add (26,931 floats)": lambda: g.add_(0.0),
            "numba call doing nothing": lambda: kernels._moments(
                scratch, scratch, scratch, 0.0, 0.0, False
            ),
            "gather, fused kernel": lambda: fused_plan.gather([p.grad for p in plain.params], g),
            "gather, fused kernel, contiguous lines": lambda: contiguous_plan.gather(
                [p.grad for p in plain.params], g
            ),
            "gather, torch ops (default)": lambda: plain._flat([p.grad for p in plain.params], "g"),
            "per-step update, torch ops (default)": plain._observe,
            "per-step update, fused kernels": monitors[(True, 10**9)]._observe,
            "emitted step, fused kernels, published": monitors[(True, 1)]._observe,
            "two records, encoded and queued at once": lambda: queued_at_once.emit_many(
                records(), check=False
            ),
            "two records, held": lambda: held.emit_many(records(), check=False),
        }
        settings: dict[str, Callable[[], Any] | None] = {
            "hot": None,
            "after a training step": train_step,
            "after 2 ms asleep": lambda: time.sleep(0.002),
        }
        times: dict[tuple[str, str], list[float]] = {(c, s): [] for c in calls for s in settings}
        for _ in range(args.rounds):
            for c, fn in calls.items():
                for s, before in settings.items():
                    times[(c, s)].append(per_call_us(fn, args.calls, before))
        for run in runs:
            run.finish()
    finally:
        redis.stop()
    lines = [
        "# Agent calls, hot and cold",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"CPU, torch threads: {args.threads}, torch {torch.__version__}, {args.rounds} "
        f"interleaved rounds of {args.calls} calls per cell; {WORKLOAD}, Adam, "
        f"{g.numel():,} sampled coordinates.",
        "",
        "Cells: median over rounds of each round's median call, µs.",
        "",
        "| call | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for c in calls:
        cells = [f"{statistics.median(times[(c, s)]):.1f}" for s in settings]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
