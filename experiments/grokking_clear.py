"""Where on the held-out curves does the grokking alarm clear?

The grokking target judges the alarm's clear against the step held-out accuracy passes
90 %, and in experiments/REPORT.md the clear comes earlier than that in 7 of 15 runs (the
best held-out accuracy by then 63–87 %). This study asks what the held-out *loss*, the
quantity the alarm is meant to track, has done by the clear, and whether the parameter
norm (which the agent could read; weight decay shrinks it as the generalizing solution
takes over, Nanda et al. 2023) times the 90 % step any better. It runs fresh grokking
seeds through the agent as `make experiments` does (full batch, the exact per-example
estimator and so the signal score, the agent's default there; stopping at 1.3× the 90 %
step), records held-out loss, accuracy and the parameter norm ‖θ‖ every 20 steps as
ground truth, and prints per run:

* the steps of the fit (training loss ≤ 0.1), of held-out accuracy 50 % and 90 %, and of
  the alarm's clear, and whether the grokking target is met;
* the held-out loss on the plateau (its median from the fit to accuracy 50 %), at the
  clear, at the 90 % step and at its minimum, and the share of its fall (on a log scale,
  from the plateau to the minimum) done by the clear and by the 90 % step;
* ‖θ‖ at the fit, at the clear, at the 90 % step and at the end, and the share of its
  fall (fit to end) done by the clear and by the 90 % step.

    python -m experiments.grokking_clear [--seeds 15,16,...] [--steps 12000]
        [--estimator per_example|streaming] [--out FILE.md]

With ``--estimator streaming`` the agent uses the streaming estimator on these full-batch
runs, and so the tail score, which docs/concepts.md says does not see grokking: what
watch's default (noise="auto") gave a full batch before it picked the per-example
estimator there (experiments/GROKKING_CLEAR_STREAMING.md).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from experiments.run_all import FULL, FULL_BATCH_RUN, GROK_JUMP, grokking_verdict
from experiments.runner import RunRecord, run_task
from experiments.side_study import finish
from experiments.tasks import Task, grokking
from server.embedded_redis import EmbeddedRedis

EVAL_EVERY = FULL_BATCH_RUN["eval_every"]
# Seeds no earlier grokking run used (REPORT.md: 0–14).
SEEDS = list(range(15, 23))


@dataclass
class Clear:
    """One grokking run's alarm clear against its held-out curves and parameter norm."""

    rec: RunRecord
    norm_steps: list[int]
    norms: list[float]

    @cached_property
    def verdict(self) -> dict[str, Any]:
        """The grokking target's verdict on the run (run_all.grokking_verdict)."""
        return grokking_verdict(self.rec)

    def at(self, step: int | None, steps: list[int], values: list[float]) -> float | None:
        """The value recorded at the last step ≤ ``step`` (None without one)."""
        if step is None:
            return None
        before = [v for s, v in zip(steps, values, strict=True) if s <= step]
        return before[-1] if before else None

    def loss_levels(self) -> tuple[float | None, float]:
        """(held-out loss on the plateau, its minimum): the plateau's median from the fit
        to held-out accuracy 50 %; None where the run has no such span."""
        v = self.verdict
        rec = self.rec
        plateau = [
            loss
            for s, loss in zip(rec.steps, rec.test_loss, strict=True)
            if v["fitted"] is not None
            and v["rising"] is not None
            and v["fitted"] <= s < v["rising"]
        ]
        return (statistics.median(plateau) if plateau else None, min(rec.test_loss))

    def loss_share(self, step: int | None) -> float | None:
        """Share of the held-out loss's fall (log scale, plateau to minimum) done by
        ``step``: 0 on the plateau, 1 at the minimum."""
        plateau, low = self.loss_levels()
        value = self.at(step, self.rec.steps, self.rec.test_loss)
        if plateau is None or value is None or plateau <= low:
            return None
        return (math.log(plateau) - math.log(value)) / (math.log(plateau) - math.log(low))

    def norm_share(self, step: int | None) -> float | None:
        """Share of ‖θ‖'s fall from the fit (training loss ≤ 0.1) to the end of the run
        done by ``step``."""
        value = self.at(step, self.norm_steps, self.norms)
        start = self.at(self.verdict["fitted"], self.norm_steps, self.norms)
        end = self.norms[-1]
        if value is None or start is None or start <= end:
            return None
        return (start - value) / (start - end)


def study(seed: int, steps: int, redis_url: str, estimator: str = "per_example") -> Clear:
    """Train one grokking seed with the agent watching, recording ‖θ‖ every EVAL_EVERY steps."""
    task = grokking(seed)
    norm_steps: list[int] = []
    norms: list[float] = []
    draw = task.batch

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Drawn before the step's forward pass: the parameters after `step` updates.
        if step % EVAL_EVERY == 0:
            with torch.no_grad():
                sq = sum(float(p.detach().pow(2).sum()) for p in task.model.parameters())
            norm_steps.append(step)
            norms.append(math.sqrt(sq))
        return draw(step)

    watched: Task = replace(task, batch=batch)
    rec = run_task(
        watched,
        "grokking",
        steps,
        redis_url,
        **{**FULL_BATCH_RUN, "estimator": estimator},
        until_accuracy=GROK_JUMP,
    )
    return Clear(rec, norm_steps, norms)


def _fmt(x: float | int | None, spec: str = "") -> str:
    return "—" if x is None else format(x, spec)


def report(runs: list[Clear], command: str, seconds: float, estimator: str = "per_example") -> str:
    """The study's markdown report."""
    how = (
        "the exact per-example estimator and so the signal score"
        if estimator == "per_example"
        else "the streaming estimator and so the tail score"
    )
    lines = [
        "# Grokking: where the alarm clears on the held-out curves",
        "",
        f"Generated by `{command}` in {seconds / 60:.1f} min (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads). Every run trains as `make experiments` trains "
        f"grokking (full batch, {how}, "
        "stopped at 1.3× the step held-out accuracy passes 90 %); held-out loss, accuracy and ‖θ‖ are recorded every "
        f"{EVAL_EVERY} steps as ground truth, which the agent never sees. Loss share: how much "
        "of the held-out loss's fall from the plateau (its median from the fit to accuracy "
        "50 %) to its minimum, on a log scale, is done by that step. Norm share: how much of "
        "‖θ‖'s fall from the fit to the end of the run.",
        "",
        "| run | fit | acc 50 % | acc 90 % | clear | target | best acc by the clear "
        "| held-out loss: plateau / clear / 90 % / min | loss share by the clear / by 90 % "
        "| ‖θ‖ fit / clear / 90 % / end | norm share by the clear / by 90 % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in runs:
        v = c.verdict
        plateau, low = c.loss_levels()
        rec = c.rec
        at_clear = c.at(v["cleared"], rec.steps, rec.test_loss)
        at_jump = c.at(v["jump"], rec.steps, rec.test_loss)
        n_fit = c.at(v["fitted"], c.norm_steps, c.norms)
        n_clear = c.at(v["cleared"], c.norm_steps, c.norms)
        n_jump = c.at(v["jump"], c.norm_steps, c.norms)
        lines.append(
            f"| {rec.name} | {_fmt(v['fitted'])} | {_fmt(v['rising'])} | {_fmt(v['jump'])} "
            f"| {_fmt(v['cleared'])} | {'met' if v['met'] else 'not met'} "
            f"| {_fmt(v['acc_at_clear'], '.0%')} "
            f"| {_fmt(plateau, '.3g')} / {_fmt(at_clear, '.3g')} / {_fmt(at_jump, '.3g')} / "
            f"{low:.3g} | {_fmt(c.loss_share(v['cleared']), '.2f')} / "
            f"{_fmt(c.loss_share(v['jump']), '.2f')} | {_fmt(n_fit, '.1f')} / {_fmt(n_clear, '.1f')}"
            f" / {_fmt(n_jump, '.1f')} / {c.norms[-1]:.1f} | "
            f"{_fmt(c.norm_share(v['cleared']), '.2f')} / {_fmt(c.norm_share(v['jump']), '.2f')} |"
        )
    verdicts = [c.verdict for c in runs]
    met = sum(v["met"] for v in verdicts)
    clears = [c.loss_share(v["cleared"]) for c, v in zip(runs, verdicts, strict=True)]
    jumps = [c.loss_share(v["jump"]) for c, v in zip(runs, verdicts, strict=True)]
    nclears = [c.norm_share(v["cleared"]) for c, v in zip(runs, verdicts, strict=True)]
    njumps = [c.norm_share(v["jump"]) for c, v in zip(runs, verdicts, strict=True)]

    def span(xs: list[float | None]) -> str:
        vals = sorted(x for x in xs if x is not None)
        if not vals:
            return "none"
        return (
            f"{vals[0]:.2f}–{vals[-1]:.2f} (median {statistics.median(vals):.2f}, n = {len(vals)})"
        )

    lines += [
        "",
        f"Grokking target on these runs: **{met}/{len(runs)}**.",
        "",
        f"* Share of the held-out loss's fall done by the clear: {span(clears)}; by the 90 % "
        f"step: {span(jumps)}.",
        f"* Share of ‖θ‖'s fall done by the clear: {span(nclears)}; by the 90 % step: "
        f"{span(njumps)}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the study and print (and with --out, write) its report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--steps", type=int, default=FULL.grok_steps)
    parser.add_argument(
        "--estimator", default="per_example", choices=["per_example", "streaming"],
        help="the agent's noise estimator: per_example (the signal score; what make "
        "experiments runs and what watch's default noise='auto' picks for a full batch) or "
        "streaming (the tail score; what noise='auto' gave full-batch runs before)",
    )  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: comma-separated integers, not {args.seeds!r}")
    if args.steps < 2 * EVAL_EVERY:
        parser.error(f"--steps must be at least {2 * EVAL_EVERY}")
    torch.set_num_threads(2)
    started = time.perf_counter()
    redis = EmbeddedRedis(Path(tempfile.mkdtemp()), appendonly=False).start()
    runs = []
    try:
        for seed in seeds:
            runs.append(study(seed, args.steps, redis.url, args.estimator))
            print(f"{runs[-1].rec.name}: done", file=sys.stderr, flush=True)
    finally:
        redis.stop()
    seconds = time.perf_counter() - started
    return finish("experiments.grokking_clear", argv, args.out,
                  lambda command: report(runs, command, seconds, args.estimator))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
