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
import math
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
from bench.process_memory import peak_resident_bytes
from bench.workloads import WORKLOADS, Workload
from monitor_agent import cpu_kernels
from server.embedded_redis import EmbeddedRedis

CONFIGS: dict[str, dict[str, Any] | None] = {
    "no monitoring": None,
    # The same plain step on its own copy of the model: the noise floor of every ratio.
    "no monitoring (A/A)": None,
    "channelscope default": {},
    # Exact columns run at their stated cadence: no budget thinning.
    "per-example every 50": {"noise": "per_example", "emit_every": 50, "budget": None},
    "per-example every step": {
        "noise": "per_example",
        "per_example_every": 1,
        "emit_every": 1,
        "budget": None,
    },
}


# The peak-memory table adds the defaults with the opt-in CPU kernels: numba and LLVM
# loaded into the process.
MEMORY_CONFIGS: dict[str, dict[str, Any] | None] = {
    **CONFIGS,
    "channelscope default, CPU kernels": {"cpu_kernels": True},
}


# With the peers, which compute their statistics every step: ours at the same cadence
# (the streaming SNR computed and published every step, no budget).
# The CPU kernels (opt-in, numba) fuse the emitted-step statistics.
EQUAL_CADENCE: dict[str, dict[str, Any] | None] = {
    "streaming every step": {"noise": "streaming", "emit_every": 1, "budget": None},
    "streaming every step, CPU kernels": {
        "noise": "streaming",
        "emit_every": 1,
        "budget": None,
        "cpu_kernels": True,
    },
}
SNR_PEERS = ("Cockpit economy + MeanGSNR", "BackPACK Variance", "torch.func vmap variance")


def _peer_over_ours(peer: float, ours: float, noise: float) -> str:
    """The peer's overhead over ours; where ours is within the A/A column's distance from
    1 (the run's noise floor), only the bound that floor gives."""
    floor = max(noise, 0.001)
    if ours <= floor:
        return f"≥ {peer / floor:.0f}× (ours within the A/A noise)"
    return f"{peer / ours:.1f}×"


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
    configs: dict[str, dict[str, Any] | None] | None = None,
    prepare: Callable[[str, cs.Run], None] | None = None,
    peer_filter: str = "",
) -> dict[str, Any]:
    """Interleaved step times of each configuration ("no monitoring" is the baseline);
    ``prepare`` gets each watched run before timing (bench/agent_breakdown.py)."""
    torch.manual_seed(0)
    base = w.make().to(device)
    x, y = w.batch(device)
    setups: dict[str, tuple[Callable[[], None], Any]] = {}
    if configs is None:
        configs = {**CONFIGS, **(EQUAL_CADENCE if with_peers else {})}
    for name, kwargs in configs.items():
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        run = None
        if kwargs is not None:
            run = cs.init("bench", f"{w.name} {name}", redis_url=redis_url)
            run.watch(model, opt, batch_size=w.batch_size, dataset_size=50_000, **kwargs)
            if prepare is not None:
                prepare(name, run)
        setups[name] = (plain_step(model, opt, x, y), run)
    skipped: dict[str, str] = {}
    for name, make in PEERS.items() if with_peers else []:
        if peer_filter not in name:
            continue
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
            train(name, warmup if name in configs else 3)
        except Exception as exc:  # a peer failing on this model is reported, not fatal
            if name in configs:
                raise
            skipped[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
            del setups[name]
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(rounds):
        for name in setups:
            # Per-step times are compared, so the slow peers (Cockpit runs two orders of
            # magnitude slower) may take fewer steps a round.
            times[name].append(train(name, steps if name in configs else max(2, steps // 10)))
    ratios = {}
    for name in setups:
        per_round = [t / b for t, b in zip(times[name], times["no monitoring"], strict=True)]
        ratios[name] = statistics.median(per_round)
    n_params = sum(p.numel() for p in base.parameters())
    extra, scratch = {}, {}
    for name, (_, run) in setups.items():
        if run is not None:
            mon = run._monitor
            extra[name] = mon.state_bytes() / (4 * n_params)
            scratch[name] = mon.workspace.nbytes() / (4 * n_params)
            run.finish()
    return {
        "step_ms": statistics.median(times["no monitoring"]) * 1e3,
        "ratios": ratios,
        "extra_buffers": extra,
        "scratch_buffers": scratch,
        "params": n_params,
        "skipped": skipped,
    }


def peak_memory_child(workload: str, config: str, device: str, redis_url: str) -> None:
    """In a fresh process: train one configuration for 30 steps and print the peak
    memory (CPU: the process's resident high-water mark; CUDA: max_memory_allocated), bytes."""
    dev = torch.device(device)
    w = next(w for w in WORKLOADS if w.name == workload)
    torch.manual_seed(0)
    model = w.make().to(dev)
    x, y = w.batch(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    kwargs = MEMORY_CONFIGS[config]
    run = None
    if kwargs is not None:
        run = cs.init("bench", f"{workload} {config} memory", redis_url=redis_url)
        run.watch(model, opt, batch_size=w.batch_size, dataset_size=50_000, **kwargs)
        if kwargs.get("cpu_kernels"):
            cpu_kernels.load(wait=True)  # loaded before the steps end, as in a long run
    step = plain_step(model, opt, x, y)
    for _ in range(30):
        step()
    _sync(dev)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_resident_bytes()
    if run is not None:
        run.finish()
    print(f"PEAK {peak}")


def peak_memory(w: Workload, device: str, redis_url: str, repeats: int = 3) -> dict[str, float]:
    """Peak memory added by each configuration over no monitoring, MiB (median of
    ``repeats`` fresh processes per configuration)."""
    import subprocess

    def measure(config: str) -> float:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", w.name, config,
             "--device", device, "--redis-url", redis_url],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return float(next(line for line in out.splitlines() if line.startswith("PEAK "))[5:])

    peaks: dict[str, list[float]] = {c: [] for c in MEMORY_CONFIGS}
    for _ in range(repeats):
        for config in MEMORY_CONFIGS:
            peaks[config].append(measure(config))
    base = statistics.median(peaks["no monitoring"])
    return {
        c: (statistics.median(v) - base) / 2**20 for c, v in peaks.items() if c != "no monitoring"
    }


def round_steps(requested: int, configs: dict[str, dict[str, Any] | None]) -> int:
    """Steps per round: at least ``requested`` and a whole number of every fixed-cadence
    configuration's emission period. Each round then holds the same number of emitted
    steps, so the median over rounds is the amortized cost; with 30-step rounds and an
    emission every 50 steps, the median fell on a round with or without the capture
    depending on how the rounds happened to line up."""
    periods = [
        int(kw.get("emit_every", 10))
        for kw in configs.values()
        if kw is not None and "budget" in kw and kw["budget"] is None
    ]
    period = math.lcm(*periods) if periods else 1
    return period * math.ceil(requested / period)


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
        "--peers-only",
        default="",
        help="substring of the peers to run (implies --peers; e.g. BackPACK, the cheapest)",
    )
    parser.add_argument(
        "--out", help="default: bench/results/agent_overhead.md (_peers.md with --peers)"
    )
    parser.add_argument("--memory", action="store_true", help="add the peak-memory table")
    parser.add_argument(
        "--memory-only", action="store_true", help="only the peak-memory table (agent_memory.md)"
    )
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.peers = args.peers or bool(args.peers_only)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        peak_memory_child(*args.memory_child, args.device, args.redis_url)
        return
    device = torch.device(args.device)
    # The CPU-kernel column's timed steps take the fused statistics from the first, as a
    # run's do once they have loaded.
    if args.peers:
        cpu_kernels.load(wait=True)
    redis = EmbeddedRedis(Path(tempfile.mkdtemp()), appendonly=False).start()
    configs = {**CONFIGS, **(EQUAL_CADENCE if args.peers else {})}
    rows = []
    try:
        for w in WORKLOADS:
            if args.only and args.only not in w.name:
                continue
            slow = "transformer" in w.name  # ~0.3 s a step on 2 CPU threads
            steps = round_steps(max(3, args.steps // 4) if slow else args.steps, configs)
            rounds = max(3, args.rounds // 2) if slow else args.rounds
            warmup = 20 if slow else 100
            if args.memory_only:
                params = sum(p.numel() for p in w.make().parameters())
                rows.append(
                    (w, {"params": params, "memory": peak_memory(w, args.device, redis.url)})
                )
                print(w.name, rows[-1][1]["memory"], flush=True)
                continue
            res = bench_workload(
                w, rounds, steps, device, redis.url, warmup, args.peers,
                configs=configs, peer_filter=args.peers_only,
            )  # fmt: skip
            res["steps"], res["rounds"] = steps, rounds
            if args.memory:
                res["memory"] = peak_memory(w, args.device, redis.url)
            rows.append((w, res))
            print(
                w.name,
                f"{res['step_ms']:.2f} ms/step",
                {k: round(v, 3) for k, v in res["ratios"].items()},
                flush=True,
            )
    finally:
        redis.stop()
    columns = [c for c in CONFIGS if c != "no monitoring"] + (
        [*EQUAL_CADENCE, *(p for p in PEERS if args.peers_only in p)] if args.peers else []
    )
    lines = [
        "# Agent overhead",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"Device: {args.device}, torch threads: {args.threads}, torch {torch.__version__}, "
        f"{args.rounds} interleaved rounds"
        + "".join(
            f" ({r['rounds']} for the {w.name})"
            for w, r in rows
            if r.get("rounds", args.rounds) != args.rounds
        )
        + " "
        f"of {'/'.join(sorted({str(r.get('steps')) for _, r in rows}))} steps: a whole number "
        "of the fixed-cadence columns' emission periods, so every round holds the same "
        "emitted steps; Adam; agent writing to a real local Redis; fused CPU statistics: "
        f"{cpu_kernels.state()}.",
        "",
        "Cells are the median over rounds of step time with the agent / step time without "
        "(1.000 = no overhead). 'state' is the agent's per-step state as a fraction of one "
        "parameter-sized float32 buffer; 'scratch' the per-step working tensors (the gathered "
        "gradient, m̂, ŝ, the statistics' rows), which the agent keeps between steps on the "
        "CPU (signal_stats.Workspace), in the same unit.",
        "",
        "| workload | step (ms) | "
        + " | ".join(columns)
        + " | state (default) | scratch (default) |",
        "|---|---|" + "---|" * len(columns) + "---|---|",
    ]
    if args.memory_only:
        lines = lines[:4]
        lines[0] = "# Agent peak memory"
        lines[3] = (
            f"Device: {args.device}, torch threads: {args.threads}, torch {torch.__version__}."
        )

    for w, res in rows if not args.memory_only else []:
        cells = [f"{res['ratios'][c]:.3f}" if c in res["ratios"] else "n/a" for c in columns]
        lines.append(
            f"| {w.name} | {res['step_ms']:.2f} | "
            + " | ".join(cells)
            + f" | {res['extra_buffers']['channelscope default']:.3f}"
            + f" | {res['scratch_buffers']['channelscope default']:.3f} |"
        )
    if args.peers:
        lines += [
            "",
            "Equal cadence: overhead (ratio − 1) of the cheapest peer that computes a gradient "
            "SNR every step, over ours computing and publishing the streaming SNR every step "
            "(with torch ops, the default, and with the opt-in fused CPU kernels, "
            "watch(cpu_kernels=True)).",
            "",
            "| workload | cheapest SNR peer | its overhead | "
            + " | ".join(f"ours, {c} | peer ÷ ours" for c in EQUAL_CADENCE)
            + " |",
            "|---|---|---|" + "---|---|" * len(EQUAL_CADENCE),
        ]
        for w, res in rows:
            ratios = res["ratios"]
            peers = [(ratios[c] - 1, c) for c in SNR_PEERS if c in ratios]
            ours = [ratios[c] - 1 for c in EQUAL_CADENCE]
            if not peers:
                cells = " | ".join(f"{100 * o:.1f} % |  " for o in ours)
                lines.append(f"| {w.name} | none ran |  | {cells} |")
                continue
            cost, name = min(peers)
            noise = abs(ratios["no monitoring (A/A)"] - 1)
            cells = " | ".join(f"{100 * o:.1f} % | {_peer_over_ours(cost, o, noise)}" for o in ours)
            lines.append(f"| {w.name} | {name} | {100 * cost:.1f} % | {cells} |")
    if args.memory or args.memory_only:
        kind = (
            "max_memory_allocated" if device.type == "cuda" else "resident high-water mark, VmHWM"
        )
        lines += [
            "",
            f"Peak memory added over no monitoring ({kind}, median of 3 fresh processes "
            "training 30 steps each), MiB; 'param buffer' is one parameter-sized float32 "
            "buffer for scale, and the A/A column is the measurement's noise floor (on CPU "
            "the resident high-water mark moves by up to ~10 MiB between identical processes, "
            "with allocator state alone; CUDA's max_memory_allocated is exact).",
            "",
            "| workload | param buffer | "
            + " | ".join(c for c in MEMORY_CONFIGS if c != "no monitoring")
            + " |",
            "|---|---|" + "---|" * (len(MEMORY_CONFIGS) - 1),
        ]
        for w, res in rows:
            mem = res["memory"]
            lines.append(
                f"| {w.name} | {4 * res['params'] / 2**20:.1f} | "
                + " | ".join(f"{mem[c]:+.1f}" for c in MEMORY_CONFIGS if c != "no monitoring")
                + " |"
            )
    notes = sorted({f"{k}: {v}" for _, r in rows for k, v in r.get("skipped", {}).items()})
    if not args.memory_only:
        lines += [
            "",
            "Peers: "
            + (describe(None) if args.peers else "not run (make bench-peers runs them)")
            + ".",
        ]
    lines += [f"* n/a — {n}" for n in notes]
    lines.append("")
    out = Path(
        args.out
        or Path(__file__).parent
        / "results"
        / (
            "agent_overhead_peers.md"
            if args.peers
            else "agent_memory.md"
            if args.memory_only
            else "agent_overhead.md"
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
