"""Equal-cadence overhead in a process that trains one model, as a user's process does.

bench/agent_overhead.py interleaves seven copies of a model in one process, and its heap
is not a training process's: there a fresh (rows × coordinates) buffer of the agent's
reused memory the other models had freed, while in a process that trains one model it can
come in new pages and fault on each (glibc's reuse depends on what the process freed
before). So this benchmark keeps one model, one optimizer and one agent per process and
switches between conditions from one round to the next:

* ours at equal cadence (one process per workload): no monitoring (the agent's hook
  returns at once); the streaming SNR computed and published every step; the same with
  every per-step tensor made anew (a workspace that keeps nothing), as before the agent
  kept them;
* ours at equal cadence with the fused CPU kernels (another process,
  ``watch(cpu_kernels=True)``, loaded before the warm-up): no monitoring; the streaming
  SNR computed and published every step;
* ours with the default settings (another process): no monitoring; ``run.watch`` with its
  defaults (3 % budget);
* BackPACK (another process, the same workload): the extended model trained without and
  with ``backpack(Variance())`` around the backward.

PyTorch's own CPU training step page-faults too, hundreds to thousands of times a step
(Adam's parameter-sized temporaries and the gradients, served by fresh mappings or by a
heap glibc has just trimmed), and how often depends on the process's allocation history,
which any extra allocation changes. ``--steady-heap`` runs the children with glibc's
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` raised (64 and 128 MiB), so that
no side faults and the ratios hold the agent's own work alone.

Each round trains every condition ``--steps`` steps in turn; cells are medians over rounds
of step time / the process's own no-monitoring step time, beside the minor page faults per
step, in all and (ours) inside the agent's hook. BackPACK needs the peers' environment (``make bench-peers``); without it its columns
read n/a. Run:

    .venv-peers/bin/python bench/single_model.py [--rounds 21] [--steps 50] [--only MLP]
        [--steady-heap]

Results go to bench/results/single_model.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import monitor_agent as cs
from bench.peers import Unsupported, backpack_variance, plain_step
from bench.workloads import WORKLOADS, Workload
from monitor_agent import cpu_kernels
from monitor_agent import signal_stats as st
from server.embedded_redis import EmbeddedRedis

OURS = ("no monitoring", "streaming every step", "the same, per-step tensors made anew")
DEFAULT = ("no monitoring", "channelscope default")
KERNELS = ("no monitoring", "streaming every step, CPU kernels")
EQUAL_CADENCE = {"noise": "streaming", "emit_every": 1, "budget": None}
# glibc serves blocks under 64 MiB from its heap and trims it only past 128 MiB free.
STEADY_HEAP = {
    "MALLOC_MMAP_THRESHOLD_": str(64 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(128 * 2**20),
}
BACKPACK = ("no monitoring", "BackPACK Variance")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# Minor page faults taken inside the agent's hook since the last reset (ours only).
HOOK_FAULTS = [0]


def _ours(w: Workload, redis_url: str, side: str) -> dict[str, Callable[[], None]]:
    """One model watched by one agent, and a step closure per condition of DEFAULT (side
    "default": the default settings), OURS ("ours": equal cadence) or KERNELS ("kernels":
    equal cadence with the fused CPU kernels)."""
    torch.manual_seed(0)
    model = w.make()
    x, y = w.batch(torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    run = cs.init("bench", f"{w.name} single model", redis_url=redis_url)
    settings: dict[str, Any] = {} if side == "default" else dict(EQUAL_CADENCE)
    if side == "kernels":
        assert cpu_kernels.load(wait=True), cpu_kernels.state()
        settings["cpu_kernels"] = True
    monitor = run.watch(model, opt, batch_size=w.batch_size, dataset_size=50_000, **settings)
    inner = monitor._observe

    def observe() -> None:
        f0 = _faults()
        inner()
        HOOK_FAULTS[0] += _faults() - f0

    kept = monitor.workspace
    per_use = st.Workspace(monitor.n_coords, monitor.dtype, torch.device("cpu"), limit=0)
    step = plain_step(model, opt, x, y)

    def condition(on: bool, workspace: st.Workspace) -> Callable[[], None]:
        def run_step() -> None:
            monitor._observe = observe if on else (lambda: None)  # type: ignore[method-assign]
            monitor.workspace = workspace
            step()

        return run_step

    if side == "default":
        return {DEFAULT[0]: condition(False, kept), DEFAULT[1]: condition(True, kept)}
    if side == "kernels":
        return {KERNELS[0]: condition(False, kept), KERNELS[1]: condition(True, kept)}
    return {
        OURS[0]: condition(False, kept),
        OURS[1]: condition(True, kept),
        OURS[2]: condition(True, per_use),
    }


def _backpack(w: Workload) -> dict[str, Callable[[], None]]:
    """One BackPACK-extended model (``extend`` works in place), trained without and with
    the Variance extension."""
    torch.manual_seed(0)
    model = w.make()
    x, y = w.batch(torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    variance = backpack_variance(model, opt, x, y)
    return {BACKPACK[0]: plain_step(model, opt, x, y), BACKPACK[1]: variance}


def child(workload: str, which: str, rounds: int, steps: int, redis_url: str) -> None:
    """In a fresh process: time one side's conditions and print them as JSON."""
    torch.set_num_threads(2)
    w = next(x for x in WORKLOADS if x.name == workload)
    try:
        conditions = _backpack(w) if which == "backpack" else _ours(w, redis_url, which)
    except Unsupported as exc:
        print("RESULT " + json.dumps({"skipped": str(exc)}))
        return
    for fn in conditions.values():  # warm-up: allocator, Adam state, the agent's windows
        for _ in range(100):
            fn()
    times: dict[str, list[float]] = {c: [] for c in conditions}
    faults: dict[str, list[float]] = {c: [] for c in conditions}
    hook: dict[str, list[float]] = {c: [] for c in conditions}
    for _ in range(rounds):
        for name, fn in conditions.items():
            HOOK_FAULTS[0] = 0
            f0, t0 = _faults(), time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - t0) / steps)
            faults[name].append((_faults() - f0) / steps)
            hook[name].append(HOOK_FAULTS[0] / steps)
    base = times[next(iter(conditions))]
    out = {
        "step_ms": statistics.median(base) * 1e3,
        "ratios": {
            c: statistics.median(t / b for t, b in zip(v, base, strict=True))
            for c, v in times.items()
        },
        "faults": {c: statistics.median(v) for c, v in faults.items()},
        "hook_faults": {c: statistics.median(v) for c, v in hook.items()},
    }
    print("RESULT " + json.dumps(out))


def _run_child(workload: str, which: str, args: argparse.Namespace, url: str) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--child", workload, which, "--rounds", str(args.rounds),
        "--steps", str(args.steps), "--redis-url", url,
    ]  # fmt: skip
    env = dict(os.environ)
    if args.steady_heap:
        env.update(STEADY_HEAP)
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line[len("RESULT ") :])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--only", default="MLP", help="substring of the workloads to run")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "SIDE"))
    parser.add_argument("--redis-url", default="")
    parser.add_argument(
        "--steady-heap", action="store_true", help="raise glibc's mmap and trim thresholds"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "single_model.md"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.rounds, args.steps, args.redis_url)
        return
    redis = EmbeddedRedis(Path(tempfile.mkdtemp()), appendonly=False).start()
    rows = []
    try:
        for w in WORKLOADS:
            if args.only in w.name and "transformer" not in w.name:
                ours = _run_child(w.name, "ours", args, redis.url)
                peer = _run_child(w.name, "backpack", args, redis.url)
                default = _run_child(w.name, "default", args, redis.url)
                kernels = _run_child(w.name, "kernels", args, redis.url)
                rows.append((w, ours, peer, default, kernels))
                print(w.name, ours, peer, default, kernels, flush=True)
    finally:
        redis.stop()
    lines = [
        "# Equal-cadence overhead in a process that trains one model",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        (
            "Heap: glibc's defaults. "
            if not args.steady_heap
            else "Heap: steady (" + ", ".join(f"{k}={v}" for k, v in STEADY_HEAP.items()) + "). "
        )
        + f"CPU, torch threads: 2, torch {torch.__version__}, {args.rounds} interleaved rounds "
        f"of {args.steps} steps per condition; Adam; ours writes to a real local Redis. One "
        "process per side and workload, each training one model; ratios are medians over "
        "rounds of step time / that process's no-monitoring step time; faults are minor "
        "page faults per training step, in all and inside the agent's hook (median over "
        "rounds).",
        "",
        "| workload | side | step (ms) | condition | ratio | faults / step | in the hook |",
        "|---|---|---|---|---|---|---|",
    ]
    for w, ours, peer, default, kernels in rows:
        sides = (
            ("ours, every step", ours),
            ("ours, every step, CPU kernels", kernels),
            ("BackPACK", peer),
            ("ours, defaults", default),
        )
        for side, res in sides:
            if "skipped" in res:
                lines.append(f"| {w.name} | {side} | | {res['skipped']} | n/a | | |")
                continue
            for c, ratio in res["ratios"].items():
                lines.append(
                    f"| {w.name} | {side} | {res['step_ms']:.2f} | {c} | {ratio:.3f} "
                    f"| {res['faults'][c]:.0f} | {res['hook_faults'].get(c, 0):.0f} |"
                )
    lines += [
        "",
        "Equal cadence: BackPACK Variance's overhead (ratio − 1) over ours, the streaming SNR "
        "computed and published every step, with torch ops (the default) and with the fused "
        "CPU kernels; the last column is ours with every per-step tensor made anew, as "
        "before the workspace.",
        "",
        "| workload | BackPACK Variance | ours | BackPACK ÷ ours | ours, CPU kernels "
        "| BackPACK ÷ ours (kernels) | ours, tensors made anew |",
        "|---|---|---|---|---|---|---|",
    ]
    for w, ours, peer, _, kernels in rows:
        mine = ours["ratios"][OURS[1]] - 1
        fused = kernels["ratios"][KERNELS[1]] - 1
        fresh = ours["ratios"][OURS[2]] - 1
        if "skipped" in peer:
            lines.append(
                f"| {w.name} | n/a | {100 * mine:.1f} % | | {100 * fused:.1f} % | "
                f"| {100 * fresh:.1f} % |"
            )
            continue
        theirs = peer["ratios"][BACKPACK[1]] - 1
        lines.append(
            f"| {w.name} | {100 * theirs:.1f} % | {100 * mine:.1f} % "
            f"| {theirs / max(mine, 1e-9):.1f}× | {100 * fused:.1f} % "
            f"| {theirs / max(fused, 1e-9):.1f}× | {100 * fresh:.1f} % |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
