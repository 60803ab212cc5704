"""Spectrum cost: one λ(W_s) update in training-step equivalents, and its amortized
overhead at the default schedule (every 500 steps). Run:

    .venv/bin/python bench/spectrum_cost.py [--probes 64,256,1024] [--device cpu]

Results go to bench/results/spectrum_cost.md (or --out).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import monitor_agent as cs
from bench.workloads import WORKLOADS, Workload

EVERY = 500


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(w: Workload, probe: int, device: torch.device, repeats: int) -> dict[str, float | str]:
    torch.manual_seed(0)
    model = w.make().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = w.batch(device)
    reps = probe // x.shape[0] + 1
    px = torch.cat([w.batch(device)[0] for _ in range(reps)])[:probe]
    with torch.no_grad():
        out = model(px[:1])
    # Regression targets of the output's shape: the cost does not depend on the loss.
    py = torch.randn(probe, out.numel(), device=device)
    run = cs.init("bench", f"spectrum {w.name} {probe}", mode="disabled")
    rss0 = _rss_mb()
    mon = run.watch(
        model, opt, batch_size=w.batch_size, dataset_size=50_000,
        probe=(px, py), probe_size=probe, spectrum_every=10**9, k=16, probe_loss="mse",
    )  # fmt: skip

    def step() -> float:
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for _ in range(3):
        step()
    step_s = statistics.median(step() for _ in range(5))
    costs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mon._update_spectrum(mon.step)
        costs.append(time.perf_counter() - t0)
    cost = statistics.median(costs)
    assert mon.gramian is not None
    result: dict[str, float | str] = {
        "path": "exact" if mon.gramian.exact else "sketch",
        "size": float(mon.gramian.n),
        "step_ms": step_s * 1e3,
        "update_s": cost,
        "step_equivalents": cost / step_s,
        "amortized": cost / (cost + EVERY * step_s),
        "rss_mb": _rss_mb() - rss0,
    }
    run.finish()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", default="64,256,1024")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-seq-probe", type=int, default=64)
    parser.add_argument("--only", default="MLP 784-1024,ResNet,transformer")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "spectrum_cost.md")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    rows = []
    for w in WORKLOADS:
        if not any(s in w.name for s in wanted):
            continue
        probes = [int(p) for p in args.probes.split(",")]
        if "transformer" in w.name:  # a probe sequence costs 128 tokens of work
            probes = [p for p in probes if p <= args.max_seq_probe]
        for probe in probes:
            res = measure(w, probe, device, args.repeats)
            rows.append((w.name, probe, res))
            print(w.name, probe, res, flush=True)
    lines = [
        "# Spectrum cost",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"Device: {args.device}, torch threads: {args.threads}, torch {torch.__version__}; Adam; "
        f"k = 16, R = 4 output projections; median of {args.repeats} updates.",
        "",
        "'step eq.' is one update's time over one training step's; 'amortized' is the share "
        f"of training time at one update every {EVERY} steps; 'RSS +MB' is the growth of the "
        "process's peak resident memory while the monitor with its probe was set up and run.",
        "",
        "| model | probe | path (n_p·R) | step (ms) | update (s) | step eq. | amortized | RSS +MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, probe, r in rows:
        lines.append(
            f"| {name} | {probe} | {r['path']} ({int(float(r['size']))}) | {float(r['step_ms']):.1f} "
            f"| {float(r['update_s']):.3f} | {float(r['step_equivalents']):.1f} "
            f"| {100 * float(r['amortized']):.2f} % | {float(r['rss_mb']):.0f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
