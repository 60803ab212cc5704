"""One experiment run: train with the agent attached to a real Redis, record held-out
ground truth (which the agent never sees), and baseline statistics on the same run."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import redis
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import monitor_agent as cs
from experiments.tasks import Task
from monitor_agent import wire
from monitor_agent.memorization import MemorizationTracker, OnsetSettings, TailStatistics


@dataclass
class RunRecord:
    """Everything the report needs about one run."""

    name: str
    kind: str
    steps: list[int] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eb: list[float] = field(default_factory=list)
    mean_gsnr: list[float] = field(default_factory=list)
    agent: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    noise: float = 0.0
    seconds: float = 0.0  # wall time of the run, so a rerun can replace its share

    def test_min_step(self) -> int:
        """Step of the held-out loss minimum."""
        return self.steps[min(range(len(self.test_loss)), key=self.test_loss.__getitem__)]

    def clear_minimum(self) -> bool:
        """True when the held-out loss rises clearly (≥ 10 %) after its minimum."""
        i = min(range(len(self.test_loss)), key=self.test_loss.__getitem__)
        return max(self.test_loss[i:]) >= 1.1 * self.test_loss[i] and 0 < i < len(self.steps) - 1

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """An agent series as (steps, values)."""
        pts = self.agent.get(name, [])
        return [p[0] for p in pts], [p[1] for p in pts]


def _loss_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
        loss = float(nn.functional.cross_entropy(out, y))
        acc = float((out.argmax(1) == y).float().mean())
    model.train(was)
    return loss, acc


def _baselines(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """The EB criterion of Mahsereci et al. (2017), as Cockpit computes it, and the mean
    GSNR (Liu et al. 2020), from per-example gradients of one batch."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_i(ps: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(
            functional_call(model, ps, (xi.unsqueeze(0),)), yi.unsqueeze(0)
        )

    per = vmap(grad(loss_i), in_dims=(None, 0, 0))(params, x, y)
    g = torch.cat([per[n].reshape(x.shape[0], -1) for n in params], dim=1)
    b, d = g.shape
    mean = g.mean(0)
    var = g.var(0, unbiased=True) + 1e-12
    eb = 1.0 - (b / d) * float((mean * mean / var).sum())
    gsnr = float((mean * mean / var).mean())
    return eb, gsnr


def run_task(
    task: Task,
    kind: str,
    steps: int,
    redis_url: str,
    *,
    eval_every: int = 10,
    probe_size: int = 256,
    noise: float = 0.0,
    memorization: dict[str, Any] | None = None,
    estimator: str = "auto",
    until_accuracy: float | None = None,
) -> RunRecord:
    """Train a task for ``steps`` optimizer steps with the agent watching it; with
    ``until_accuracy``, stop sooner, at 1.3× the step held-out accuracy first reaches it
    (the harness reads the ground truth; the agent never does)."""
    rec = RunRecord(task.name, kind, noise=noise)
    assert task.train_x is not None and task.train_y is not None
    probe = (task.train_x[:probe_size], task.train_y[:probe_size])
    config = {"task": task.name, "steps": steps, "batch_size": task.batch_size}
    with cs.init("experiments", task.name, config=config, redis_url=redis_url) as run:
        run.watch(
            task.model, task.optimizer, batch_size=task.batch_size,
            dataset_size=task.dataset_size, probe=probe, emit_every=10, k=8, noise=estimator,
            # A fixed cadence: these runs measure the indicator, not the overhead budget
            # (which on these millisecond steps would space emissions out).
            budget=None, memorization=memorization,
        )  # fmt: skip
        stop = steps
        for step in range(steps):
            if step >= stop:
                break
            x, y = task.batch(step)
            task.model.train()
            loss = nn.functional.cross_entropy(task.model(x), y)
            loss.backward()
            if step % eval_every == 0:
                eb, gsnr = _baselines(task.model, x[:64], y[:64])
                tl, ta = _loss_acc(task.model, task.test_x, task.test_y)
                train_l = (
                    _loss_acc(task.model, task.train_x, task.train_y)[0]
                    if task.dataset_size is not None
                    else loss.item()
                )
                rec.steps.append(step)
                rec.test_loss.append(tl)
                rec.test_acc.append(ta)
                rec.train_loss.append(train_l)
                rec.eb.append(eb)
                rec.mean_gsnr.append(gsnr)
                if until_accuracy is not None and stop == steps and ta >= until_accuracy:
                    # Long enough after the jump to see an alarm clear up to 30 % late.
                    stop = min(steps, math.ceil(1.3 * step))
            task.optimizer.step()
            task.optimizer.zero_grad(set_to_none=True)
            run.log({"train/loss": loss.item()}, step)
    read_back(redis_url, run, rec)
    return rec


def timed(label: str, job: Callable[[], RunRecord]) -> RunRecord:
    """Run one experiment job, keep its wall time (seconds) on the record, and print it."""
    t0 = time.perf_counter()
    rec = job()
    rec.seconds = time.perf_counter() - t0
    print(f"{label}: {rec.seconds:.1f}s", flush=True)
    return rec


def read_back(
    redis_url: str,
    run: cs.Run,
    rec: RunRecord,
    scalars: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Fill ``rec`` with the agent's series and alarm events as a finished run left them in
    Redis; ``scalars`` also sees every scalars record (curves the script logged itself)."""
    client = redis.Redis.from_url(redis_url)
    try:
        for _, fields in client.xrange(run.keys.stream(run.id, "scalars")):
            r = wire.decode("scalars", fields)
            if scalars is not None:
                scalars(r)
            for name, value in r["s"].items():
                if name.startswith(("memorization/", "signal/", "spectrum/")) and math.isfinite(
                    value
                ):
                    rec.agent.setdefault(name, []).append((r["step"], value))
        for _, fields in client.xrange(run.keys.stream(run.id, "events")):
            ev = wire.decode("events", fields)
            if ev["kind"].startswith("memorization"):
                rec.events.append(ev)
    finally:
        client.close()


def replay(
    rec: RunRecord, window: int, scale: float = OnsetSettings().signal_scale
) -> list[dict[str, Any]]:
    """The alarm events the agent would have published on a recorded full-batch run with
    this signal window and scale (the signal score, default settings otherwise)."""
    settings = replace(OnsetSettings(), score="signal", signal_window=window, signal_scale=scale)
    return replay_tracker(rec, MemorizationTracker(0.0, None, settings))


def probe_summaries(rec: RunRecord) -> dict[int, TailStatistics]:
    """The probe summaries the agent published on a run (median and disagreeing share; the
    quantiles the scores do not use are 0), by step."""
    median = dict(zip(*rec.series("memorization/probe_loss_median"), strict=True))
    return {
        step: TailStatistics(median[step], 0.0, 0.0, share)
        for step, share in zip(*rec.series("memorization/disagree_fraction"), strict=True)
        if step in median
    }


def replay_tracker(rec: RunRecord, tracker: MemorizationTracker) -> list[dict[str, Any]]:
    """Feed a recorded full-batch run's training loss, probe summaries and signal excess
    through ``tracker`` (left holding the run's final state) and return its alarm events."""
    events: list[dict[str, Any]] = []
    # The recorded training loss (every eval_every steps; live, the agent saw every step)
    # feeds the descent factor, the falling-loss condition and the tail's "at its low".
    losses = iter(zip(rec.steps, rec.train_loss, strict=True))
    pending = next(losses, None)
    summaries = probe_summaries(rec)
    last_probe = 0
    for step, excess in zip(*rec.series("memorization/signal_excess"), strict=True):
        while pending is not None and pending[0] <= step:
            tracker.observe_loss(pending[1])
            pending = next(losses, None)
        if step in summaries:
            tracker.observe_tail(summaries[step], step - last_probe, step)
            last_probe = step
        tracker.observe_excess(excess, step)
        events += tracker.step_onset(step)
    return events
