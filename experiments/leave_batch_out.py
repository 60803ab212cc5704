"""Does a training example the step did not train on stand in for a held-out one?

A candidate for a validation-free held-out estimate: at every optimizer step, the change
of the per-example loss on the training probe's examples that are *not* in the step's
batch. If those examples behaved like unseen data, the running sum of that change would
trace the held-out loss, and its minimum would time the memorization onset without any
threshold. The agent cannot see which examples a batch holds, so this study runs
outside it, on the label-noise tasks (the digits MLP and the generated clusters of
experiments/other_tasks.py; the CNN with ``--tasks cnn``), and prints per run:

* the step of the held-out (clean-label) loss minimum, recorded every 10 steps as ground
  truth;
* the step where the running sum of the leave-batch-out change is lowest (the
  candidate's own minimum);
* the first step after the 200-step warm-up from which the change, averaged over the
  next ``--window`` steps, is no longer negative (the candidate as an alarm);

and, per task, how many noisy runs have each within ×1.5 of the held-out minimum.

    python -m experiments.leave_batch_out [--tasks digits,mixture] [--seeds 0,1,2]
        [--steps 3000] [--window 250] [--out FILE.md]

It costs two extra probe forward passes every step (the agent probes every 50).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from experiments.run_all import onset_hits
from experiments.side_study import finish
from experiments.tasks import (
    Task,
    digits_cnn_label_noise,
    digits_label_noise,
    mixture_label_noise,
)

TASKS: dict[str, Callable[[float, int], Task]] = {
    "digits": digits_label_noise,
    "mixture": mixture_label_noise,
    "cnn": digits_cnn_label_noise,
}
PROBE = 256  # the agent's default probe size: the first PROBE training examples
WARMUP = 200  # the agent's warm-up
EVAL_EVERY = 10


@dataclass
class Study:
    """One run's leave-batch-out changes (every step) and its held-out ground truth."""

    name: str
    noise: float
    change: list[float] = field(default_factory=list)  # mean Δloss off the batch, per step
    eval_steps: list[int] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)

    def held_out_minimum(self) -> tuple[int, bool]:
        """Step of the held-out loss minimum and whether the loss rises ≥ 10 % after it."""
        i = min(range(len(self.test_loss)), key=self.test_loss.__getitem__)
        clear = max(self.test_loss[i:]) >= 1.1 * self.test_loss[i]
        return self.eval_steps[i], clear and 0 < i < len(self.test_loss) - 1

    def sum_minimum(self) -> int:
        """Step at which the running sum of the leave-batch-out change is lowest."""
        total, best, at = 0.0, 0.0, 0
        for step, d in enumerate(self.change):
            total += d
            if total < best:
                best, at = total, step
        return at

    def turn(self, window: int) -> int | None:
        """First step ≥ WARMUP from which the mean change over ``window`` steps is ≥ 0."""
        for start in range(WARMUP, len(self.change) - window + 1):
            if sum(self.change[start : start + window]) >= 0:
                return start
        return None


def probe_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy on the probe, in eval mode, without gradients."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = nn.functional.cross_entropy(model(x), y, reduction="none")
    model.train(was)
    return out


def study(task: Task, noise: float, steps: int) -> Study:
    """Train ``task`` for ``steps`` steps, measuring the probe before and after each."""
    assert task.train_x is not None and task.train_y is not None and task.indices is not None
    px, py = task.train_x[:PROBE], task.train_y[:PROBE]
    rec = Study(task.name, noise)
    model, opt = task.model, task.optimizer
    for step in range(steps):
        idx = task.indices(step)
        before = probe_loss(model, px, py)
        if step % EVAL_EVERY == 0:
            rec.eval_steps.append(step)
            rec.test_loss.append(float(probe_loss(model, task.test_x, task.test_y).mean()))
        model.train()
        loss = nn.functional.cross_entropy(model(task.train_x[idx]), task.train_y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        off = torch.ones(PROBE, dtype=torch.bool)
        off[idx[idx < PROBE]] = False  # probe examples this step trained on
        rec.change.append(float((probe_loss(model, px, py) - before)[off].mean()))
    return rec


def report(studies: list[Study], window: int, command: str, seconds: float) -> str:
    """The per-run table and the per-task counts, as markdown."""
    lines = [
        "# Leave-batch-out: does a training example off the batch stand in for a held-out one?",
        "",
        f"Generated by `{command}` in {seconds / 60:.1f} min (torch {torch.__version__}, one "
        "thread). At every step, the mean change of the loss on the training probe's "
        "examples the step did not train on; its running sum would trace the held-out loss "
        "if those examples behaved like unseen ones. Ground truth: the clean-label held-out "
        f"loss every {EVAL_EVERY} steps. Onsets count from the agent's {WARMUP}-step warm-up; "
        "a hit is within ×1.5 of the held-out minimum's step.",
        "",
        "| run | held-out min step | clear min | running-sum min | within ×1.5 "
        f"| change ≥ 0 over {window} steps from | within ×1.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    counts: dict[str, list[int]] = {}
    for s in studies:
        minimum, clear = s.held_out_minimum()
        low, turn = s.sum_minimum(), s.turn(window)
        hit_low, hit_turn = onset_hits(low, minimum), onset_hits(turn, minimum)
        lines.append(
            f"| {s.name} | {minimum} | {'yes' if clear else 'no'} | {low} | "
            f"{'yes' if hit_low else 'no'} | {'—' if turn is None else turn} | "
            f"{'yes' if hit_turn else 'no'} |"
        )
        if s.noise > 0 and clear:
            task = s.name.split(" noise=")[0]
            c = counts.setdefault(task, [0, 0, 0])
            c[0] += 1
            c[1] += hit_low
            c[2] += hit_turn
    lines += ["", "| task | noisy runs with a clear minimum | running-sum min within ×1.5 "
              "| turn within ×1.5 |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {t} | {n} | {a}/{n} | {b}/{n} |" for t, (n, a, b) in counts.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the study and print (and with --out, write) its report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="digits,mixture")
    parser.add_argument("--noises", default="0,0.1,0.2,0.4")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--window", type=int, default=250)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    names = args.tasks.split(",")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        parser.error(f"--tasks: unknown {', '.join(unknown)} (known: {', '.join(TASKS)})")
    if args.steps <= WARMUP + args.window:
        parser.error(f"--steps must exceed the warm-up ({WARMUP}) plus --window")
    torch.set_num_threads(1)
    started = time.perf_counter()
    studies = []
    for name in names:
        for noise in (float(v) for v in args.noises.split(",")):
            for seed in (int(v) for v in args.seeds.split(",")):
                studies.append(study(TASKS[name](noise, seed), noise, args.steps))
                print(f"{studies[-1].name}: done", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - started
    return finish("experiments.leave_batch_out", argv, args.out,
                  lambda command: report(studies, args.window, command, seconds))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
