"""Spectrum cost: one λ(W_s) update in training-step equivalents, and its amortized
overhead at the default schedule (every 500 steps). Run:

    .venv/bin/python bench/spectrum_cost.py [--probes 64,256,1024] [--device cpu]

Results go to bench/results/spectrum_cost.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import monitor_agent as cs
from bench.process_memory import peak_resident_bytes
from bench.workloads import WORKLOADS, Workload
from monitor_agent.spectrum import SpectrumSchedule

EVERY = 500


def _auto_every(cost_s: float, step_s: float) -> int:
    """The interval ``spectrum_every="auto"`` settles on for this cost (budget 3 %)."""
    sched = SpectrumSchedule("auto", 0.03)
    sched.last_time -= cost_s + 1000 * step_s  # as if 1,000 steps and one update had passed
    sched.done(1000, cost_s)
    return sched.every


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
    rss0 = peak_resident_bytes() / 2**20
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
        "rss_mb": peak_resident_bytes() / 2**20 - rss0,
    }
    run.finish()
    return result


def _child(name: str, probe: int, device: str, repeats: int) -> None:
    w = next(w for w in WORKLOADS if w.name == name)
    print("RESULT " + json.dumps(measure(w, probe, torch.device(device), repeats)), flush=True)


def _run_row(name: str, probe: int, args: argparse.Namespace) -> dict[str, Any]:
    """One (model, probe) cell in a fresh process: its peak memory is its own, and a
    process killed for memory is reported instead of ending the benchmark."""
    cmd = [sys.executable, __file__, "--child", name, str(probe), "--device", args.device,
           "--threads", str(args.threads), "--repeats", str(args.repeats)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out: dict[str, Any] = json.loads(line[7:])
            return out
    reason = "killed (out of memory)" if proc.returncode in (-9, 137) else proc.stderr[-300:]
    return {"error": reason}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", default="64,256,1024")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-seq-probe", type=int, default=256)
    parser.add_argument("--row-timeout", type=float, default=1800)
    parser.add_argument("--only", default="MLP 784-1024,ResNet,transformer")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--render",
        action="store_true",
        help="rewrite the table from the measured rows saved beside it (no measuring): "
        "the derived columns follow the current auto schedule",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="measure only the selected cells and replace them in the saved rows (the other "
        "cells keep their earlier measurement; both commands are recorded)",
    )
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "spectrum_cost.md")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        _child(args.child[0], int(args.child[1]), args.device, args.repeats)
        return
    raw_path = Path(args.out).with_suffix(".json")
    if args.render:
        saved = json.loads(raw_path.read_text())
        write_table(args.out, saved["command"], saved["header"], saved["rows"])
        return
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    rows: list[tuple[str, int, dict[str, Any]]] = []
    for w in WORKLOADS:
        if not any(s in w.name for s in wanted):
            continue
        for probe in [int(p) for p in args.probes.split(",")]:
            if "transformer" in w.name and probe > args.max_seq_probe:
                # A probe sequence costs 128 tokens of work: listed, not run.
                res = {"error": f"not run (above --max-seq-probe {args.max_seq_probe})"}
                rows.append((w.name, probe, res))
                continue
            try:
                res = _run_row(w.name, probe, args)
            except subprocess.TimeoutExpired:
                res = {"error": f"stopped after {args.row_timeout:.0f} s"}
            rows.append((w.name, probe, res))
            print(w.name, probe, res, flush=True)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    header = (
        f"Device: {args.device}, torch threads: {args.threads}, torch {torch.__version__}; Adam; "
        f"k = 16, R = 4 output projections; median of {args.repeats} updates; each row in a "
        "fresh process."
    )
    if args.merge:
        saved = json.loads(raw_path.read_text())
        if saved["header"] != header:
            sys.exit(f"--merge: settings differ from the saved rows ({saved['header']})")
        fresh = {(name, probe): res for name, probe, res in rows}
        rows = [(n, p, fresh.pop((n, p), res)) for n, p, res in saved["rows"]]
        rows += [(n, p, res) for (n, p), res in fresh.items()]
        command = f"{saved['command']}`, then `{command}"
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    raw_path.write_text(json.dumps({"command": command, "header": header, "rows": rows}, indent=1))
    write_table(args.out, command, header, rows)


def write_table(out: str, command: str, header: str, rows: list[Any]) -> None:
    """The results table from measured rows; 'auto every' and 'auto' are derived here."""
    lines = [
        "# Spectrum cost",
        "",
        f"Command: `{command}` (measured rows in spectrum_cost.json)  ",
        header,
        "",
        "'step eq.' is one update's time over one training step's; 'at 500' is the share of "
        f"training time at one update every {EVERY} steps; 'auto every' is the interval the "
        'default `spectrum_every="auto"` settles on for this cost (3 % budget, at most '
        "1,000,000), and 'auto' the share it then costs; 'RSS +MB' is the growth of the "
        "process's peak resident memory from setting up the monitor to the end of the "
        "updates (the per-example Jacobian blocks and product chunks are capped by "
        "`spectrum_memory`, 1 GiB by default).",
        "",
        "| model | probe | path (n_p·R) | step (ms) | update (s) | step eq. | at 500 | auto every | auto | RSS +MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, probe, r in rows:
        if "error" in r:
            error = " ".join(str(r["error"]).split()).replace("|", "/")
            lines.append(f"| {name} | {probe} | not measured: {error} |" + " |" * 7)
            continue
        every = _auto_every(r["update_s"], r["step_ms"] / 1e3)
        auto = r["update_s"] / (r["update_s"] + every * r["step_ms"] / 1e3)
        lines.append(
            f"| {name} | {probe} | {r['path']} ({int(r['size'])}) | {r['step_ms']:.1f} "
            f"| {r['update_s']:.3f} | {r['step_equivalents']:.1f} "
            f"| {100 * r['amortized']:.2f} % | {every:,} | {100 * auto:.2f} % "
            f"| {r['rss_mb']:.0f} |"
        )
    # A row may carry a note on how it was measured (added by hand to the JSON).
    notes = [(name, probe, r["note"]) for name, probe, r in rows if "note" in r]
    if notes:
        lines.append("")
        lines += [f"* {name}, probe {probe}: {note}" for name, probe, note in notes]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
