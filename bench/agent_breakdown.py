"""Where the agent's equal-cadence overhead goes: the streaming statistic computed and
published every step, taken apart in one interleaved run.

Configurations, each on its own copy of the model (same seed and batch):
* no monitoring, twice (the second is the A/A noise floor);
* the streaming update alone (the per-step gather and the two running moments; statistics
  emitted only at step 0);
* the update plus the emitted step with the per-layer statistics free (the first call's
  result handed back on every later one) and nothing published: what the emitted step
  costs besides ``signal_stats.layer_statistics``, the floor a fused statistics pass
  could reach;
* the update plus every emitted-step statistic, computed and moved to the host but not
  published (the monitor's publish step replaced by a no-op);
* everything: computed and published every step through the sender thread to a real Redis;
* everything again, with every per-step tensor (the gathered gradient, m̂, ŝ, the
  statistics' rows) made anew on every call (a workspace that keeps nothing), as before
  the monitor kept them: its row is what the kept workspace saves;
* everything, with each emitted step's publishing (formatting, encoding, queueing its
  records) handed to a thread of its own instead of done in the hook: whether taking it
  off the training thread pays (compare with 'update + statistics + publish');
* everything, with each emitted step's records encoded and queued at once, as before the
  run held records that come within HOLD_S (50 ms) of its last hand-off to the sender:
  what holding them saves (compare with 'update + statistics + publish').

Each part's cost is the difference of medians of per-round ratios to the plain step, in
milliseconds of that step. With ``--cpu-kernels`` (watch(cpu_kernels=True)) an emitted
step gathers the gradients, updates the moments and computes the statistics in one kernel
that does not go through ``layer_statistics``: the 'statistics free' row, which would not
isolate anything, is left out, and 'update + statistics' is the whole emitted step but its
publishing. Run:

    .venv/bin/python bench/agent_breakdown.py [--rounds 15] [--steps 30] [--only MLP] [--cpu-kernels]

Results go to bench/results/agent_breakdown.md (or --out).
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import monitor_agent as cs
from bench.agent_overhead import bench_workload
from bench.workloads import WORKLOADS
from monitor_agent import cpu_kernels
from monitor_agent import signal_stats as st
from server.embedded_redis import EmbeddedRedis

layer_statistics = st.layer_statistics

STREAMING = {"noise": "streaming", "budget": None}
PARTS: dict[str, dict[str, Any] | None] = {
    "no monitoring": None,
    "no monitoring (A/A)": None,
    "update only": {**STREAMING, "emit_every": 10**9},
    "update + emitted step, statistics free": {**STREAMING, "emit_every": 1},
    "update + statistics": {**STREAMING, "emit_every": 1},
    "update + statistics + publish": {**STREAMING, "emit_every": 1},
    "the same, per-step tensors made anew": {**STREAMING, "emit_every": 1},
    "everything, publishing on a thread of its own": {**STREAMING, "emit_every": 1},
    "everything, each step's records queued at once": {**STREAMING, "emit_every": 1},
}


# Rows that vary the whole emitted step rather than add a part: compared with this row.
ALTERNATIVES = {
    "the same, per-step tensors made anew": "update + statistics + publish",
    "everything, publishing on a thread of its own": "update + statistics + publish",
    "everything, each step's records queued at once": "update + statistics + publish",
}

# Per configuration, the time of each call of the monitor's hook (its optimizer pre-hook's
# work, publishing on the training thread included; not the sender thread's), seconds.
HOOK_TIMES: dict[str, list[float]] = {}


def _prepare(name: str, run: cs.Run) -> None:
    """Set a watched run up as its configuration's row asks, and time its hook."""
    monitor = run._monitor
    assert monitor is not None
    observe = monitor._observe
    calls = HOOK_TIMES.setdefault(name, [])

    def timed_observe() -> None:
        t0 = time.perf_counter()
        observe()
        calls.append(time.perf_counter() - t0)

    monitor._observe = timed_observe  # type: ignore[method-assign]
    if name == "the same, per-step tensors made anew":
        monitor.workspace = st.Workspace(monitor.n_coords, monitor.dtype, monitor.s.device, limit=0)
    if name == "everything, publishing on a thread of its own":
        # Each emitted step's records formatted, encoded and queued by another thread:
        # whether taking publishing off the training thread pays on these cores.
        publish = monitor._publish
        pending: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()

        def publisher() -> None:
            while True:
                publish(*pending.get())

        threading.Thread(target=publisher, name="bench-publisher", daemon=True).start()
        monitor._publish = lambda *args: pending.put(args)  # type: ignore[method-assign]
    if name == "everything, each step's records queued at once":
        run._hold_s = 0.0  # every record handed to the sender when it is made
    if name in ("update + statistics", "update + emitted step, statistics free"):
        # Everything up to the host transfer, nothing handed to the sender.
        monitor._publish = lambda *args: None
    if name == "update + emitted step, statistics free":
        emit = monitor._emit
        first: list[Any] = []

        def cached(*args: Any, **kwargs: Any) -> Any:
            if not first:
                first.append(layer_statistics(*args, **kwargs))
            return first[0]

        def emit_with_free_statistics(*args: Any) -> None:
            # Only this monitor's emitted steps see the cached statistics.
            st.layer_statistics = cached
            try:
                emit(*args)
            finally:
                st.layer_statistics = layer_statistics

        monitor._emit = emit_with_free_statistics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="784-512", help="substring of the workloads to run")
    parser.add_argument(
        "--cpu-kernels", action="store_true", help="watch(cpu_kernels=True): fused statistics"
    )
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "agent_breakdown.md")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = dict(PARTS)
    if args.cpu_kernels:
        del parts["update + emitted step, statistics free"]
        for kwargs in parts.values():
            if kwargs is not None:
                kwargs["cpu_kernels"] = True
        # Timed steps take the fused statistics from the first, as a run's do once loaded.
        cpu_kernels.load(wait=True)
    redis = EmbeddedRedis(Path(tempfile.mkdtemp()), appendonly=False).start()
    results = []
    try:
        for w in WORKLOADS:
            if args.only in w.name and "transformer" not in w.name:
                res = bench_workload(
                    w, args.rounds, args.steps, torch.device("cpu"), redis.url,
                    configs=parts, prepare=_prepare,
                )  # fmt: skip
                res["hook_us"] = {k: 1e6 * statistics.median(v) for k, v in HOOK_TIMES.items()}
                res["hook_mean_us"] = {k: 1e6 * statistics.fmean(v) for k, v in HOOK_TIMES.items()}
                HOOK_TIMES.clear()
                results.append((w, res))
                print(w.name, results[-1][1], flush=True)
    finally:
        redis.stop()
    lines = [
        "# Agent overhead at equal cadence, by part",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"CPU, torch threads: {args.threads}, torch {torch.__version__}, {args.rounds} "
        "interleaved rounds of "
        f"{args.steps} steps; Adam; the streaming estimator, no budget; a real local Redis; "
        + (
            "statistics by the fused CPU kernels (watch(cpu_kernels=True))."
            if args.cpu_kernels
            else "statistics by torch ops (the default)."
        ),
        "",
        "Ratios are medians over rounds of (step time) / (plain step time); a part's cost is "
        "the difference between consecutive rows (the last two rows: from 'update + "
        "statistics + publish'), in ms of the plain step. 'hook' is the "
        "median time of one call of the monitor's optimizer pre-hook on the training thread "
        "(warm-up included; the sender thread's work is not in it), µs; 'hook mean' its mean, "
        "which counts the calls that hand held records to the sender (one in several when "
        "records come faster than every 50 ms) at their share.",
        "",
        "| workload | plain step (ms) | configuration | ratio | added (ms) | this part (ms) "
        "| hook (µs) | hook mean (µs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w, res in results:
        step_ms = res["step_ms"]
        previous = 0.0
        added_by: dict[str, float] = {}
        for name, ratio in res["ratios"].items():
            added = (ratio - 1) * step_ms
            added_by[name] = added
            if name in ALTERNATIVES:  # variants of the whole, not one more part
                previous = added_by[ALTERNATIVES[name]]
            part = "" if name.startswith("no monitoring") else f"{added - previous:+.2f}"
            if not name.startswith("no monitoring"):
                previous = added
            hook = res["hook_us"].get(name)
            hook_us = "" if hook is None else f"{hook:.0f}"
            mean = res["hook_mean_us"].get(name)
            mean_us = "" if mean is None else f"{mean:.0f}"
            lines.append(
                f"| {w.name} | {step_ms:.2f} | {name} | {ratio:.3f} | {added:+.2f} | {part} "
                f"| {hook_us} | {mean_us} |"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
