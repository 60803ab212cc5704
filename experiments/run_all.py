"""Run every experiment, score the indicators against held-out ground truth, and write
experiments/REPORT.md with its figures. ``make experiments`` runs the full set;
``--quick`` a small one (used by a test).

    .venv/bin/python -m experiments.run_all [--quick] [--out experiments]
"""

from __future__ import annotations

import argparse
import itertools
import math
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from experiments.runner import (
    RunRecord,
    probe_summaries,
    replay,
    replay_tracker,
    run_task,
    timed,
)
from experiments.tasks import Task, digits_full_batch, digits_label_noise, fresh_data, grokking
from monitor_agent.memorization import (
    MemorizationTracker,
    OnsetRule,
    OnsetSettings,
)
from server.embedded_redis import EmbeddedRedis

DEFAULTS = OnsetSettings()


@dataclass
class Plan:
    noises: list[float]
    seeds: list[int]
    steps: int
    fresh_seeds: list[int]
    # Grokking trains until held-out accuracy jumps (1.3× the step it passes GROK_JUMP),
    # at most grok_steps: at a fixed 8,000 steps one seed stopped while still rising.
    grok_steps: int
    grok_seeds: list[int]
    # (Adam learning rate, steps) of the time-scale runs, and their noise rates and seeds
    timescales: list[tuple[float, int]]
    timescale_noises: list[float]
    timescale_seeds: list[int]


FULL = Plan(
    [0.0, 0.1, 0.2, 0.4], [0, 1, 2], 3000, [0, 1, 2], 12000, [0, 1, 2, 3, 4],
    [(1e-4, 5000), (6e-4, 3000)], [0.2, 0.4], [0, 1, 2],
)  # fmt: skip
QUICK = Plan([0.0, 0.2], [0], 1200, [0], 0, [], [], [], [])
# Seeds never looked at while choosing the definition: a check of the chosen default.
# 3–4 were run after the reference was chosen on 0–2; 5–7 after θ_on was fixed as well.
VALIDATION_SEEDS = [3, 4, 5, 6, 7]
# Grokking seeds run only after the signal score's window and scale were fixed on seeds 0–4.
# Ten more grokking runs (5–9, then 10–14 for a larger sample) would take `make experiments`
# past its hour on two cores, so they run on their own:
# `python -m experiments.run_all --rerun grokking-heldout`.
GROK_HELDOUT_SEEDS = list(range(5, 15))
# Full-batch clean-label digits: the signal score's control (the controls above all train on
# mini-batches, where the tail score is used). Outside the default plan for its hour, too:
# `python -m experiments.run_all --rerun fullbatch-clean`.
# Seeds 3–5 were run only after the signal score took the descent into account (chosen
# on a fresh seed-0 run and checked by replaying seeds 0–2 and the grokking records).
# Seeds 6–8 were first run as a check of the larger of the signal and tail scores (then
# the default; chosen by replaying seeds 0–5 and the noisy seeds 0–4).
FULLBATCH_SEEDS = [0, 1, 2, 3, 4, 5, 6, 7, 8]
# Full-batch digits with label noise: full-batch runs that memorize (the held-out loss rises
# as the noisy labels are fitted), judged like the label-noise runs: onset within ×1.5 of
# the held-out minimum. `python -m experiments.run_all --rerun fullbatch-noisy`.
# 20 % on seeds 0–2 was run first, right after the descent factor was chosen; the other
# rates and seeds 3–4 were added afterwards as a sweep, with nothing changed in between.
# Seeds 5–7 were first run as a check of the larger of the signal and tail scores (then
# the default, now score="signal_or_tail").
FULLBATCH_NOISY_SEEDS = [0, 1, 2, 3, 4, 5, 6, 7]
FULLBATCH_NOISES = [0.1, 0.2, 0.4]
# Kinds that only `--rerun KIND` runs; the report times them apart from the default plan.
EXTRA_KINDS = ("grokking-heldout", "fullbatch-clean", "fullbatch-noisy")
FULL_BATCH_KINDS = ("grokking", *EXTRA_KINDS)
# The label-noise runs by how they bear on the default: report label -> RunRecord.kind.
GROUPS = {
    "seeds 0–2 (the default was chosen on these)": "digits",
    "validation seeds 3–7 (3–4 run after the reference was chosen, 5–7 after θ_on was "
    "fixed too)": "digits-validation",
    "time scale: Adam lr 10⁻⁴ and 6·10⁻⁴ instead of 3·10⁻⁴, noise 20 % and 40 %, "
    "seeds 0–2": "digits-timescale",
}


def _onset(
    steps: list[int],
    scores: list[float],
    falling: list[bool] | None = None,
    theta_on: float = DEFAULTS.theta_on,
) -> tuple[int | None, int | None]:
    """The agent's onset rule (warm-up, θ_on, θ_off, P) applied to any score series."""
    rule = OnsetRule(theta_on, DEFAULTS.theta_off, DEFAULTS.patience)
    onset = cleared = None
    for i, (step, score) in enumerate(zip(steps, scores, strict=True)):
        if step < DEFAULTS.warmup_steps:
            continue
        change = rule.advance(step, score, True if falling is None else falling[i])
        if change == "onset" and onset is None:
            onset = rule.onset_step
        elif change == "cleared" and onset is not None and cleared is None:
            cleared = step
    return onset, cleared


def _thin(steps: list[int], values: list[float], every: int) -> tuple[list[int], list[float]]:
    out = [(s, v) for s, v in zip(steps, values, strict=True) if s % every == 0]
    return [s for s, _ in out], [v for _, v in out]


# Variants of the tail score, replayed offline with the agent's own tracker and onset rule
# on the probe summaries the agent published during the run.
TAIL_VARIANTS = {  # each OnsetSettings with score="tail" (set in replay_tail)
    "tail, ref when median < 0.25": OnsetSettings(
        reference="fitted", fitted_loss=0.25, theta_on=0.3
    ),
    "tail, ref when median < 1.0": OnsetSettings(reference="fitted", fitted_loss=1.0, theta_on=0.3),
    "tail, ref = peak after warm-up, θ_on = 0.3": OnsetSettings(reference="peak", theta_on=0.3),
    "tail, ref = peak after warm-up, θ_on = 0.5": OnsetSettings(reference="peak", theta_on=0.5),
    "tail, ref = peak after warm-up, θ_on = 0.7": OnsetSettings(reference="peak", theta_on=0.7),
}


# The full-batch scores, replayed offline (experiments/full_batch_scores.py prints them per
# run): the signal score alone (the default), and the larger of it and the tail score, whose
# reference comes from every probe after warm-up or only from probes taken at a
# training-loss low (opt-in: score="signal_or_tail").
FULL_BATCH_DEFAULT = OnsetSettings(score="signal")  # what watch() picks for full batch
FULL_BATCH_VARIANTS = {
    "signal (the agent's)": FULL_BATCH_DEFAULT,
    "signal or tail, H_ref = peak": OnsetSettings(score="signal_or_tail", reference="peak"),
    "signal or tail, H_ref = peak at a training-loss low": OnsetSettings(
        score="signal_or_tail", reference="peak_at_low"
    ),
}


def replay_tail(
    rec: RunRecord, settings: OnsetSettings, tracker: MemorizationTracker | None = None
) -> tuple[int | None, int | None]:
    """Onset and clear of the agent's tracker with ``settings`` (or of ``tracker``, left
    holding the run's final state) fed the run's published probe summaries (every 50
    steps) and training loss (every 10 steps)."""
    summaries = probe_summaries(rec)
    if not summaries:
        return None, None
    loss = dict(zip(rec.steps, rec.train_loss, strict=True))
    if tracker is None:
        tracker = MemorizationTracker(1.0, math.log(10), replace(settings, score="tail"))
    onset = cleared = None
    for step in range(0, max(rec.steps) + 1, 10):
        if step in loss:
            tracker.observe_loss(loss[step])
        if step in summaries:
            tracker.observe_tail(summaries[step], 50, step)
        for ev in tracker.step_onset(step):
            if ev["kind"] == "memorization_onset" and onset is None:
                onset = ev["step"]
            elif ev["kind"] == "memorization_cleared" and onset is not None and cleared is None:
                cleared = ev["step"]
    return onset, cleared


def best_constant_step(runs: list[RunRecord], every: int = 50) -> int | None:
    """The one step that, taken as every run's onset, lands within ×1.5 of the most
    held-out minima of ``runs`` (the earliest such step): a baseline that ignores the run."""
    if not runs:
        return None
    last = max(max(r.steps) for r in runs)
    minima = [r.test_min_step() for r in runs]
    return max(
        range(DEFAULTS.warmup_steps, last + 1, every),
        key=lambda c: (sum(onset_hits(c, m) for m in minima), -c),
    )


def candidates(rec: RunRecord) -> dict[str, tuple[int | None, int | None]]:
    """Onset (and clear) steps of every candidate indicator on one run."""
    out: dict[str, tuple[int | None, int | None]] = {}
    for label, settings in TAIL_VARIANTS.items():
        out[label] = replay_tail(rec, settings)
    for name in ("tail_score", "gradient_score"):
        steps, values = rec.series(f"memorization/{name}")
        out[name.removesuffix("_score")] = (
            _onset(*_thin(steps, values, 50)) if steps else (None, None)
        )
    falling = [True] + [b < a for a, b in zip(rec.train_loss, rec.train_loss[1:], strict=False)]
    eb_score = [1.0 if v > 0 else 0.0 for v in rec.eb]
    out["EB criterion"] = _onset(*_thin(rec.steps, eb_score, 50), theta_on=0.5)
    peak, gsnr_score = 0.0, []
    for s, v in zip(rec.steps, rec.mean_gsnr, strict=True):
        peak = max(peak, v) if s >= DEFAULTS.warmup_steps else peak
        gsnr_score.append(min(1.0, max(0.0, 1 - v / peak)) if peak > 0 else 0.0)
    out["mean GSNR"] = _onset(*_thin(rec.steps, gsnr_score, 50))
    plateau = []
    for i, s in enumerate(rec.steps):
        j = max(0, i - 20)
        drop = (rec.train_loss[j] - rec.train_loss[i]) / max(abs(rec.train_loss[j]), 1e-12)
        plateau.append(1.0 if s >= 200 and drop < 0.05 else 0.0)
    out["loss plateau"] = _onset(*_thin(rec.steps, plateau, 50), theta_on=0.5)
    del falling
    return out


# How every full-batch run is trained and recorded (run_task's keywords): the exact
# per-example estimator, which gives the agent's default score there, the signal score.
FULL_BATCH_RUN: dict[str, Any] = {"eval_every": 20, "estimator": "per_example"}
GROK_FITTED = 0.1  # training loss at which the training set counts as fitted
GROK_JUMP = 0.9  # held-out accuracy whose step the alarm's clear is judged against


def onset_hits(onset: int | None, minimum: int) -> bool:
    """The timing target: an onset within a factor 1.5 of the held-out minimum's step."""
    return onset is not None and minimum / 1.5 <= onset <= minimum * 1.5


def grokking_verdict(rec: RunRecord) -> dict[str, Any]:
    """The grokking target on one run: the agent's first alarm falls on the memorization
    plateau (from the step the training loss reaches GROK_FITTED to the step held-out
    accuracy passes 50 %), and its first clear after that lies within 20 % of the step
    held-out accuracy passes 90 %."""

    def first(flags: list[bool]) -> int | None:
        return next((s for s, f in zip(rec.steps, flags, strict=True) if f), None)

    fitted = first([v <= GROK_FITTED for v in rec.train_loss])
    rising = first([a >= 0.5 for a in rec.test_acc])
    jump = first([a >= GROK_JUMP for a in rec.test_acc])
    onset = next((e["step"] for e in rec.events if e["kind"] == "memorization_onset"), None)
    cleared = next(
        (
            e["step"]
            for e in rec.events
            if e["kind"] == "memorization_cleared" and onset is not None and e["step"] > onset
        ),
        None,
    )
    on_plateau = (
        onset is not None
        and fitted is not None
        and rising is not None
        and fitted - 50 <= onset < rising
    )
    at_jump = cleared is not None and jump is not None and abs(cleared - jump) <= 0.2 * jump
    score = next((e["data"].get("score_kind") for e in rec.events if "data" in e), "no alarm")
    # Where the alarm finally rests: the last clear, if no onset follows it.
    last = rec.events[-1] if rec.events else None
    settled = last["step"] if last is not None and last["kind"] == "memorization_cleared" else None
    # Clears that an onset follows: the alarm let go for a moment and fired again.
    kinds = [e["kind"] for e in rec.events]
    blips = sum(
        a == "memorization_cleared" and b == "memorization_onset"
        for a, b in itertools.pairwise(kinds)
    )
    at_rise = settled is not None and rising is not None and abs(settled - rising) <= 0.2 * rising
    # The best held-out accuracy reached by the clear: how far up the rise it lets go (the
    # best, not the last evaluation, which a loss spike can pull down for a few steps).
    acc_at_clear = (
        None
        if cleared is None
        else max(a for s, a in zip(rec.steps, rec.test_acc, strict=True) if s <= cleared)
    )
    return {
        "fitted": fitted, "rising": rising, "jump": jump, "onset": onset, "cleared": cleared,
        "fires_on_plateau": on_plateau, "clears_at_jump": at_jump,
        "met": on_plateau and at_jump, "score": score, "settled": settled,
        "settles_at_rise": at_rise, "blips": blips, "acc_at_clear": acc_at_clear,
    }  # fmt: skip


def full_batch_verdict(rec: RunRecord, events: list[dict[str, Any]]) -> tuple[str, bool]:
    """(group, target met) of a full-batch run with these alarm events: grokking runs by
    the grokking target, clean-label runs by silence, label-noise runs by an onset within
    ×1.5 of the held-out minimum (groups "grokking", "clean", "noisy 10%", …)."""
    onset = next((e["step"] for e in events if e["kind"] == "memorization_onset"), None)
    if rec.kind.startswith("grokking"):
        return "grokking", bool(grokking_verdict(replace(rec, events=events))["met"])
    if rec.kind == "fullbatch-clean":
        return "clean", onset is None
    return f"noisy {rec.noise:.0%}", onset_hits(onset, rec.test_min_step())


def _recorded_with_other_score(runs: list[RunRecord]) -> list[str]:
    """A report line for full-batch runs recorded while another score was the default:
    whether the default, replayed on them, gives the alarm events they had live."""
    other = [
        r
        for r in runs
        if any(e.get("data", {}).get("score_kind") not in (None, "signal") for e in r.events)
    ]
    if not other:
        return []
    kinds = sorted({e["data"]["score_kind"] for r in other for e in r.events if "data" in e})
    same = sum(
        alarm_history(replay_tracker(r, MemorizationTracker(0.0, None, FULL_BATCH_DEFAULT)))
        == alarm_history(r.events)
        for r in other
    )
    return [
        f"  {len(other)} of these runs were recorded with the score {', '.join(kinds)} as the "
        f"default; replayed with the signal score (the default), {same}/{len(other)} give "
        "the same alarm events as live."
    ]


def full_batch_comparison(runs: list[RunRecord]) -> list[str]:
    """Report lines: each full-batch score variant replayed on the full-batch runs, with
    its count of runs meeting their target per group."""
    groups: dict[str, int] = {}
    for rec in runs:
        group, _ = full_batch_verdict(rec, rec.events)
        groups[group] = groups.get(group, 0) + 1
    order = sorted(groups, key=lambda g: (g != "grokking", g != "clean", g))
    lines = [
        "",
        "### The full-batch score",
        "",
        "Each full-batch run above replayed through the agent's tracker with each score (its "
        "published signal excess every 10 steps, probe summaries every 50, and the training "
        "loss recorded every 20 steps, where the agent saw every step; so a replay can differ "
        "a little from the live alarm). Targets: grokking as in the list above; clean labels: no alarm; "
        "label noise: onset within ×1.5 of the held-out minimum.",
        "",
        "| score | " + " | ".join(order) + " |",
        "|---|" + "---|" * len(order),
    ]
    references: dict[str, list[float]] = {}
    for label, settings in FULL_BATCH_VARIANTS.items():
        met = dict.fromkeys(order, 0)
        for rec in runs:
            tracker = MemorizationTracker(0.0, None, settings)
            group, ok = full_batch_verdict(rec, replay_tracker(rec, tracker))
            met[group] += ok
            if settings.resolved_reference() == "peak_at_low" and tracker.h_ref is not None:
                references.setdefault(group, []).append(tracker.h_ref)
        lines.append(f"| {label} | " + " | ".join(f"{met[g]}/{groups[g]}" for g in order) + " |")
    if references:
        spans = [f"{g} {min(v):.3f}–{max(v):.3f}" for g in order if (v := references.get(g))]
        lines += [
            "",
            "The tail's reference at training-loss lows (H̄, the disagreeing share smoothed over "
            f"~{DEFAULTS.ema_steps} steps, at the probes after warm-up taken at a low), by "
            f"group: {', '.join(spans)}. Below {DEFAULTS.min_reference} the tail score is 0.",
        ]
    return lines


def alarm_history(events: list[dict[str, Any]]) -> str:
    """A run's alarm events in order, as "onset at 200, cleared at 3880"."""
    return ", ".join(f"{e['kind'].removeprefix('memorization_')} at {e['step']}" for e in events)


def _alarms_against_minimum(runs: list[RunRecord]) -> str:
    """Each run's alarm events beside its held-out loss minimum, for a report line."""
    return "; ".join(
        f"{r.name}: {alarm_history(r.events) or 'no alarm'}, held-out loss minimum at "
        f"{r.test_min_step()}" + ("" if r.clear_minimum() else " (no clear minimum)")
        for r in runs
    )


def excess_levels(rec: RunRecord, window: int) -> tuple[float | None, float | None]:
    """The highest median excess (over ``window`` steps ending at an emitted step) on the
    plateau, from a window after the fit to held-out accuracy 50 %, and the lowest from a
    window after held-out accuracy passed 90 %; None where the run has no such span."""
    v = grokking_verdict(rec)
    steps, excess = rec.series("memorization/signal_excess")
    medians = []
    for i, step in enumerate(steps):
        inside = [
            e for s, e in zip(steps[: i + 1], excess[: i + 1], strict=True) if s > step - window
        ]
        medians.append((step, statistics.median(inside)))
    plateau_end = v["rising"] if v["rising"] is not None else steps[-1] + 1
    plateau = [
        m for s, m in medians if v["fitted"] is not None and v["fitted"] + window <= s < plateau_end
    ]
    after = [m for s, m in medians if v["jump"] is not None and s >= v["jump"] + window]
    return (max(plateau) if plateau else None, min(after) if after else None)


def _levels_line(runs: list[RunRecord]) -> str:
    """Where the runs' plateau and generalized excess lie against the signal score's clear
    level: the evidence for the scale on the runs of this report."""
    window = DEFAULTS.signal_window
    clear_level = (1 - DEFAULTS.theta_off) * DEFAULTS.signal_scale
    levels = [(r.name, *excess_levels(r, window)) for r in runs]
    highs = [(h, name) for name, h, _ in levels if h is not None]
    lows = [(lo, name) for name, _, lo in levels if lo is not None]
    parts = [f"On the runs above ({window}-step medians of the signal excess; clear level "
             f"E ≥ {clear_level:.3g}):"]  # fmt: skip
    if highs:
        top = max(highs)
        reach = sum(h >= clear_level for h, _ in highs)
        parts.append(f"the highest on a plateau is {top[0]:.2f} ({top[1]}), and {reach} of "
                     f"{len(highs)} plateaus reach the clear level;")  # fmt: skip
    if lows:
        bottom = min(lows)
        below = sum(lo < clear_level for lo, _ in lows)
        parts.append(f"the lowest once held-out accuracy had passed 90 % is {bottom[0]:.2f} "
                     f"({bottom[1]}), below the clear level in {below} of {len(lows)} runs.")  # fmt: skip
    if not highs and not lows:
        parts.append("no run has a plateau or a generalized stretch that long.")
    return " ".join(parts)


def _grokking_lines(runs: list[RunRecord], label: str) -> list[str]:
    """The grokking target per run and over a group of runs, as report lines."""
    if not runs:
        return []
    lines = []
    verdicts = [grokking_verdict(r) for r in runs]
    for r, v in zip(runs, verdicts, strict=True):
        history = alarm_history(r.events)
        lines.append(
            f"* Grokking ({r.name}, score: {v['score']}): the training set is fitted (loss ≤ "
            f"{GROK_FITTED}) at step {_fmt(v['fitted'])} and held-out accuracy passes 50 % at "
            f"{_fmt(v['rising'])} and 90 % at {_fmt(v['jump'])}; alarm at {_fmt(v['onset'])} "
            f"({'during' if v['fires_on_plateau'] else 'not during'} the plateau), cleared at "
            f"{_fmt(v['cleared'])} ({'within' if v['clears_at_jump'] else 'not within'} 20 % of "
            f"the 90 % step) — **{'met' if v['met'] else 'not met'}**. Every alarm event of the "
            f"run: {history or 'none'}."
            + (
                ""
                if v["acc_at_clear"] is None
                else f" Best held-out accuracy by the clear: {v['acc_at_clear']:.0%}."
            )
        )
    met = sum(v["met"] for v in verdicts)
    blips = sum(v["blips"] > 0 for v in verdicts)
    reached = [v for v in verdicts if v["jump"] is not None]
    never = [v for v in verdicts if v["jump"] is None]
    at_clear = sorted(v["acc_at_clear"] for v in verdicts if v["acc_at_clear"] is not None)
    lines.append(
        f"* Grokking target over the {label}: **{met}/{len(verdicts)}** ({met}/{len(reached)} "
        "of the runs whose held-out accuracy passed 90 % within the run). The alarm fires on "
        f"the plateau in {sum(v['fires_on_plateau'] for v in verdicts)}/{len(verdicts)}, clears "
        f"for a moment on the plateau and fires again in {blips}/{len(verdicts)}."
        + (
            " Best held-out accuracy by the clear: " + ", ".join(f"{a:.0%}" for a in at_clear) + "."
            if at_clear
            else ""
        )
        + (
            f" Held-out accuracy never passed 90 % in {len(never)} run(s); the alarm was "
            f"still on at the end in {sum(v['settled'] is None for v in never)} of them."
            if never
            else ""
        )
    )
    older = [
        r
        for r in runs
        if r.series("memorization/signal_excess")[0]
        and not r.series("memorization/descent_excess")[0]
    ]
    if older:
        # Runs recorded before the signal score had its descent factor: what it changes.
        same = sum(
            [(e["kind"], e["step"]) for e in replay(r, DEFAULTS.signal_window)]
            == [(e["kind"], e["step"]) for e in r.events]
            for r in older
        )
        lines.append(
            f"  {len(older)} of these runs were recorded before the signal score took the "
            f"descent factor; replayed with it (their recorded excess and training loss), "
            f"{same}/{len(older)} give the same alarm events as live."
        )
    return lines


def q_over_t_correlation(rec: RunRecord, window: int = 100) -> float | None:
    """Pearson correlation, over windows, of the predicted Q/T (increments of the
    population- and train-progress curves) with the measured held-out/train improvement
    ratio ΔL_test/ΔL_train."""
    ps, pv = rec.series("memorization/population_progress")
    ts, tv = rec.series("memorization/train_progress")
    pp, tp = dict(zip(ps, pv, strict=True)), dict(zip(ts, tv, strict=True))
    test = dict(zip(rec.steps, rec.test_loss, strict=True))
    train = dict(zip(rec.steps, rec.train_loss, strict=True))
    pred, meas = [], []
    for s in range(window, max(rec.steps) + 1, window):
        a = s - window
        if not all(k in d for d in (pp, tp, test, train) for k in (a, s)):
            continue
        dt = tp[s] - tp[a]
        dl_train = train[a] - train[s]
        if dt <= 0 or dl_train <= 1e-4:
            continue
        pred.append((pp[s] - pp[a]) / dt)
        meas.append((test[a] - test[s]) / dl_train)
    if len(pred) < 4:
        return None
    mp, mm = statistics.fmean(pred), statistics.fmean(meas)
    cov = sum((p - mp) * (m - mm) for p, m in zip(pred, meas, strict=True))
    vp = sum((p - mp) ** 2 for p in pred)
    vm = sum((m - mm) ** 2 for m in meas)
    return cov / math.sqrt(vp * vm) if vp > 0 and vm > 0 else None


def figure(rec: RunRecord, out: Path) -> str:
    """Plot a run into out/figures and return the figure's path relative to ``out``."""
    slug = rec.name.replace(" ", "_").replace("=", "").replace("%", "pct")
    (out / "figures").mkdir(parents=True, exist_ok=True)
    _plot(rec, out / "figures" / f"{slug}.png")
    return f"figures/{slug}.png"


def _plot(rec: RunRecord, path: Path) -> None:
    """Held-out and training loss above; the scores and the agent's alarms (red: onset,
    green: cleared) below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(rec.steps, rec.test_loss, label="held-out loss (ground truth)", color="#dc2626")
    ax1.plot(rec.steps, rec.train_loss, label="training loss", color="#2563eb")
    ax1.axvline(rec.test_min_step(), color="#dc2626", ls=":", label="held-out minimum")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    ax1.set_title(rec.name, fontsize=10)
    curves = (
        ("tail_score", "#16a34a", "-"),
        ("gradient_score", "#9333ea", "-"),
        ("signal_score", "#0891b2", "-"),
        ("signal_excess", "#0891b2", "--"),
        ("disagree_fraction", "#ea580c", "--"),
    )
    for name, colour, style in curves:
        s, v = rec.series(f"memorization/{name}")
        if s:
            ax2.plot(s, v, label=name.replace("_", " "), color=colour, ls=style)
    for e in rec.events:
        onset = e["kind"] == "memorization_onset"
        ax2.axvline(e["step"], color="#b91c1c" if onset else "#15803d", ls=":", lw=1)
    ax2.axvline(rec.test_min_step(), color="#dc2626", ls=":")
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_xlabel("step")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _fmt(x: float | int | None, digits: int = 2) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _time_by_kind(records: list[RunRecord]) -> str:
    """Wall minutes of the runs of each kind, for records that carry their time."""
    minutes: dict[str, float] = {}
    for r in records:
        if r.seconds > 0:
            minutes[r.kind] = minutes.get(r.kind, 0.0) + r.seconds / 60
    if not minutes:
        return ""
    return (
        " Training time by kind: " + ", ".join(f"{k} {m:.1f} min" for k, m in minutes.items()) + "."
    )


def write_report(records: list[RunRecord], out: Path, command: str, seconds: float) -> str:
    """The markdown report: per-run table, candidate comparison, targets."""
    # Runs outside the default plan (its hour's budget) are timed apart from it.
    extra = sum(r.seconds for r in records if r.kind in EXTRA_KINDS)
    extra_note = (
        f" for the default plan, plus {extra / 60:.1f} min for the runs outside it "
        f"({', '.join(EXTRA_KINDS)})"
        if extra
        else ""
    )
    lines = [
        "# Memorization onset without a validation set: evidence",
        "",
        f"Generated by `{command}` in {(seconds - extra) / 60:.1f} min{extra_note} "
        f"(torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads). The agent never sees the held-out data; it is "
        "recorded here only as ground truth." + _time_by_kind(records),
        "",
        "Onset rule for every candidate (the agent's): warm-up "
        f"{DEFAULTS.warmup_steps} steps, arm at score ≥ θ_on ({DEFAULTS.theta_on}; 0.5 for the "
        "0/1 baselines; the tail variants below state theirs), "
        f"fire after P = {DEFAULTS.patience} consecutive 50-step windows (the onset is the first), "
        f"clear after P windows at ≤ θ_off = {DEFAULTS.theta_off}.",
        "",
        "## Runs",
        "",
        "| run | held-out min step | clear min | agent onset | cleared | tail | gradient | EB | mean GSNR | loss plateau | corr(Q/T, measured) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    per_run = []
    for rec in records:
        onsets = candidates(rec)
        agent_onset = next(
            (e["step"] for e in rec.events if e["kind"] == "memorization_onset"), None
        )
        agent_clear = next(
            (e["step"] for e in rec.events if e["kind"] == "memorization_cleared"), None
        )
        corr = q_over_t_correlation(rec)
        per_run.append((rec, onsets, agent_onset, corr))
        lines.append(
            f"| [{rec.name}]({figure(rec, out)}) | {rec.test_min_step()} | {'yes' if rec.clear_minimum() else 'no'} "
            f"| {_fmt(agent_onset)} | {_fmt(agent_clear)} | "
            + " | ".join(
                _fmt(onsets[c][0])
                for c in ("tail", "gradient", "EB criterion", "mean GSNR", "loss plateau")
            )
            + f" | {_fmt(corr)} |"
        )

    lines += ["", "## Candidates against the targets", ""]
    lines += [
        "Label-noise runs with a clear minimum, onset within ×1.5: on seeds 0–2 (where the "
        "tail variants were compared) and on every label-noise run (seeds 0–7 and the "
        "time-scale runs); controls: every clean-label and fresh-data run.",
        "",
        "| indicator | seeds 0–2 | all label-noise runs | clean + fresh runs: no alarm |",
        "|---|---|---|---|",
    ]
    onsets_of = {id(r): o for r, o, _, _ in per_run}
    by_group = {
        label: [r for r, _, _, _ in per_run if r.kind == kind and r.noise > 0 and r.clear_minimum()]
        for label, kind in GROUPS.items()
    }
    chosen_on = by_group[next(iter(GROUPS))]
    noisy_all = [r for runs in by_group.values() for r in runs]
    noisy = [(r, onsets_of[id(r)]) for r in chosen_on]
    controls = [
        (r, o)
        for r, o, _, _ in per_run
        if r.kind == "fresh" or (r.kind.startswith("digits") and r.noise == 0)
    ]

    def share(flags: list[bool]) -> str:
        pct = _fmt(100 * sum(flags) / len(flags), 0) if flags else "—"
        return f"{sum(flags)}/{len(flags)} ({pct} %)"

    for cand in (*TAIL_VARIANTS, "tail", "gradient", "EB criterion", "mean GSNR", "loss plateau"):
        lines.append(
            f"| {cand} | {share([onset_hits(o[cand][0], r.test_min_step()) for r, o in noisy])} "
            f"| {share([onset_hits(onsets_of[id(r)][cand][0], r.test_min_step()) for r in noisy_all])} "
            f"| {share([o[cand][0] is None for _, o in controls])} |"
        )
    early = [r.name for r in noisy_all if r.test_min_step() < DEFAULTS.warmup_steps]
    lines += [
        "",
        f"{len(early)} of these {len(noisy_all)} label-noise runs have their held-out minimum before the "
        f"{DEFAULTS.warmup_steps}-step warm-up ({', '.join(early) or 'none'}); no rule with a "
        "warm-up can hit them, and they are counted as misses.",
        "",
        "### How the default was chosen",
        "",
        "The first tail definition froze the reference H_ref when the probe's median loss first "
        "fell below 0.25 (row 'ref when median < 0.25', the agent's live alarm in the first full "
        "run): it never fired on 40 %-noise runs, whose median stays high while the noisy "
        "examples are being fitted. Taking the largest disagreeing fraction seen after warm-up "
        "as the reference ('ref = peak') fires on them and keeps every control silent, and has "
        "no loss threshold to tune, so it became the default. This choice was made on seeds "
        "0–2; seeds 3–4 were run only afterwards, as a check.",
        "",
        "The threshold θ_on was then revisited after a fix to the ground truth: the digits "
        "inputs had been standardized by each pixel's training-set spread plus 10⁻⁶, and "
        "border pixels that are constant in the training set but not in the held-out set were "
        "blown up by ~10⁶, so the held-out loss started near 10 and its 'minimum' fell at "
        "artifact steps (0–50 on some seeds). With each pixel's spread floored at one grey "
        "level the held-out minima moved to 360–1,650 steps. On seeds 0–2 the previous θ_on = "
        "0.3 fired as early as the rule allows (steps 450–550) on every noisy run; θ_on = 0.5 "
        "(rows 'θ_on = …' above, the same recorded runs replayed) hit the most runs there and "
        "became the default; seeds 3–4 are again the check, and seeds 5–7 and the time-scale "
        "runs below were added only after that, with the default unchanged.",
    ]
    alarm = {id(r): a for r, _, a, _ in per_run}
    constant = best_constant_step(chosen_on)
    lines += [
        "",
        "### Does the alarm follow the run, or would a fixed step do?",
        "",
        "A fair reference for the timing target: one fixed step used as every run's onset, "
        f"the one that hits the most of the seed 0–2 runs (an oracle fitted on them: step "
        f"{_fmt(constant)}). The agent's live alarm, default settings:",
        "",
        "| label-noise runs with a clear minimum | runs | agent's alarm within ×1.5 "
        f"| fixed step {_fmt(constant)} within ×1.5 |",
        "|---|---|---|---|",
    ]
    a_all = sum(onset_hits(alarm[id(r)], r.test_min_step()) for r in noisy_all)
    for label, runs in [*by_group.items(), ("all", noisy_all)]:
        if runs:
            a_hits = sum(onset_hits(alarm[id(r)], r.test_min_step()) for r in runs)
            c_hits = sum(onset_hits(constant, r.test_min_step()) for r in runs)
            lines.append(f"| {label} | {len(runs)} | {a_hits} | {c_hits} |")
    timescale = [(r, alarm[id(r)]) for r, _, _, _ in per_run if r.kind == "digits-timescale"]
    if timescale:
        lines += [
            "",
            "| time-scale run | held-out min step | agent onset | within ×1.5 |",
            "|---|---|---|---|",
        ]
        for r, a in timescale:
            verdict = (
                "—"
                if not r.clear_minimum()
                else ("yes" if onset_hits(a, r.test_min_step()) else "no")
            )
            lines.append(f"| {r.name} | {r.test_min_step()} | {_fmt(a)} | {verdict} |")
    controls_all = [r for r, _ in controls]
    silent = sum(alarm[id(r)] is None for r in controls_all)
    corrs = [c for _, _, _, c in per_run if c is not None]
    h_rate = a_all / len(noisy_all) if noisy_all else None
    s_rate = silent / len(controls_all) if controls_all else None
    lines += [
        "",
        "## Targets (the agent's own alarm, default settings, every run above)",
        "",
        f"* Label-noise runs with a clear held-out minimum, onset within a factor 1.5 of its "
        f"step in ≥ 80 %: {a_all}/{len(noisy_all)} — "
        f"**{'met' if h_rate is not None and h_rate >= 0.8 else 'not met'}** (by group in the "
        "table above).",
        f"* Clean-label and fresh-data runs with no alarm in ≥ 90 %: {silent}/{len(controls_all)} — "
        f"**{'met' if s_rate is not None and s_rate >= 0.9 else 'not met'}**.",
    ]
    fullbatch = [r for r, _, _, _ in per_run if r.kind == "fullbatch-clean"]
    if fullbatch:
        quiet = sum(alarm[id(r)] is None for r in fullbatch)
        lines.append(
            f"* Full-batch clean-label runs (the full-batch score's control, outside the default "
            f"plan: `python -m experiments.run_all --rerun fullbatch-clean`) with no alarm: "
            f"{quiet}/{len(fullbatch)} ({_alarms_against_minimum(fullbatch)})."
        )
    memorizing = [r for r, _, _, _ in per_run if r.kind == "fullbatch-noisy"]
    if memorizing:
        clear = [r for r in memorizing if r.clear_minimum()]
        hits = sum(onset_hits(alarm[id(r)], r.test_min_step()) for r in clear)
        rates = sorted({r.noise for r in memorizing})
        lines.append(
            f"* Full-batch runs with label noise (runs that memorize; outside the default "
            f"plan: `python -m experiments.run_all --rerun fullbatch-noisy`), onset within "
            f"×1.5 of a clear held-out minimum: {hits}/{len(clear)} in all, by rate "
            + ", ".join(
                f"{z:.0%} {sum(onset_hits(alarm[id(r)], r.test_min_step()) for r in at_z)}/{len(at_z)}"
                for z in rates
                for at_z in [[r for r in clear if r.noise == z]]
            )
            + "."
        )
        for z in rates:
            at_rate = [r for r in memorizing if r.noise == z]
            lines.append(f"  * {z:.0%}: {_alarms_against_minimum(at_rate)}.")
    grok = [r for r, _, _, _ in per_run if r.kind == "grokking"]
    heldout = [r for r, _, _, _ in per_run if r.kind == "grokking-heldout"]
    lines += _grokking_lines(
        grok, "seeds 0–4, on which the signal score's window and scale were chosen"
    )
    lines += _grokking_lines(
        heldout,
        f"held-out seeds {_seed_span(GROK_HELDOUT_SEEDS)}, run after the window and scale "
        "were fixed "
        "(`python -m experiments.run_all --rerun grokking-heldout`)",
    )
    if grok:
        lines.append(
            f"  How the signal score's window ({DEFAULTS.signal_window} steps) and scale "
            f"({DEFAULTS.signal_scale}) were chosen: by replaying the signal excess recorded on "
            "seeds 0–4 on earlier days through the onset rule (`python -m "
            "experiments.signal_window --scales 0.1,0.25` replays the runs above and prints "
            "their levels). On those recordings, with the earlier scale 0.1, a 200-step median "
            "cleared for a moment on the plateau in 4 of 8 replayed runs, 400 steps in 1 of 10, "
            "800 in none of 8, and the final clear came at the start of the held-out rise "
            "(seed 4: at step 3,310, with held-out accuracy at 28 %); the scale 0.25 put the "
            "clear level (E ≥ 0.225) between the highest 800-step median excess on any of "
            "their plateaus (0.18) and the lowest once held-out accuracy had passed 90 % "
            "(0.28). The runs above are not those recordings: grokking is not reproducible "
            "from one day to the next (one seed's 50 % step moved by 2,020 steps between two "
            "days; floating-point differences, which grokking amplifies, are the likely "
            "cause), and where a run's rise is slow the clear comes before held-out accuracy "
            "reaches 90 % (the best held-out accuracy by the clear is listed per run)."
        )
        lines.append("  " + _levels_line(grok + heldout))
        lines.append(
            "  Grokking trains on the full batch with the exact per-example estimator, so the "
            "agent's default score is the signal score (docs/concepts.md): the share of "
            "coordinates whose training-set gradient survives leaving one training example "
            "out, beyond the share that opens by chance. It falls to chance while the "
            "training set is memorized and rises again as the generalizing solution forms "
            "(the figure's signal excess); the tail score, which needs examples the network "
            "disagrees with, has none on this plateau but those of the training-loss spikes."
        )
        lines += _recorded_with_other_score(grok + heldout)
    else:
        lines.append("* Grokking: not run in this mode (`make experiments` runs it).")
    lines.append(
        f"* Correlation of the predicted Q/T with the measured held-out/train improvement ratio "
        f"(per run, 100-step windows): median {_fmt(statistics.median(corrs) if corrs else None)} "
        f"over {len(corrs)} runs."
    )
    full = [r for r, _, _, _ in per_run if r.kind in FULL_BATCH_KINDS]
    if full:
        lines += full_batch_comparison(full)
    text = "\n".join(lines) + "\n"
    (out / "REPORT.md").write_text(text)
    return text


def _seed_span(seeds: list[int]) -> str:
    """'5–14' for a run of consecutive seeds."""
    return f"{seeds[0]}–{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    parser.add_argument(
        "--from-records", default=None,
        help="rebuild the report from a records file of an earlier run, without training",
    )  # fmt: skip
    parser.add_argument(
        "--rerun", default=None, metavar="KIND",
        help="run only the runs of one kind (digits, digits-validation, digits-timescale, "
        "fresh, grokking; outside the default plan: grokking-heldout, seeds "
        f"{_seed_span(GROK_HELDOUT_SEEDS)}, "
        "fullbatch-clean and fullbatch-noisy) and "
        "replace them in out/records.pkl; the report lists both commands",
    )  # fmt: skip
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    torch.set_num_threads(2)
    out = Path(args.out)
    started = time.perf_counter()
    command = "make experiments" if not args.quick else "python -m experiments.run_all --quick"
    if args.rerun:
        command = f"python -m experiments.run_all --rerun {args.rerun}"
    saved_records = out / "out" / "records.pkl"
    if args.rerun and not saved_records.exists():
        # Checked before training: a rerun replaces one kind in the saved records.
        parser.error(f"--rerun needs the records of an earlier full run: {saved_records} is "
                     "missing (run `make experiments` first)")  # fmt: skip
    if args.from_records:
        with open(args.from_records, "rb") as fh:
            saved = pickle.load(fh)
        print(write_report(saved["records"], out, saved["command"], saved["seconds"]))
        return 0
    redis = EmbeddedRedis(Path(tempfile.mkdtemp()), appendonly=False).start()
    records: list[RunRecord] = []
    jobs: list[tuple[str, str, Callable[[], RunRecord]]] = []  # label, kind, run
    seeds = plan.seeds + ([] if args.quick else VALIDATION_SEEDS)
    for noise in plan.noises:
        for seed in seeds:
            kind = "digits-validation" if seed in VALIDATION_SEEDS else "digits"
            jobs.append((f"digits {noise} {seed}", kind, lambda n=noise, s=seed, k=kind: run_task(
                digits_label_noise(n, s), k, plan.steps, redis.url, noise=n)))  # fmt: skip
    # The same task on a slower and a faster clock: every run above has its held-out
    # minimum between steps ~350 and ~1,650, where one fixed step already lands within ×1.5
    # of most of them; these runs ask whether the alarm follows the run's own time scale.
    for lr, steps in plan.timescales:
        for noise in plan.timescale_noises:
            for seed in plan.timescale_seeds:
                jobs.append((f"digits {noise} {seed} lr {lr:g}", "digits-timescale", lambda n=noise, s=seed, lr=lr, k=steps: run_task(
                    digits_label_noise(n, s, lr=lr), "digits-timescale", k, redis.url, noise=n)))  # fmt: skip
    for seed in plan.fresh_seeds:
        jobs.append(
            (
                f"fresh {seed}",
                "fresh",
                lambda s=seed: run_task(fresh_data(s), "fresh", plan.steps, redis.url),
            )
        )
    # Full batch: the exact per-example estimator sees the whole training set every step,
    # and the agent's default score is then the signal score (DESIGN §4.5, docs/concepts.md).
    # (kind, seeds, task, steps, label noise, held-out accuracy that ends the run early)
    full_batch: list[tuple[str, list[int], Callable[[int], Task], int, float, float | None]] = [
        ("grokking", plan.grok_seeds, grokking, plan.grok_steps, 0.0, GROK_JUMP)
    ]
    if args.rerun in EXTRA_KINDS:  # outside the default plan: only when named
        full_batch += [
            ("grokking-heldout", GROK_HELDOUT_SEEDS, grokking, FULL.grok_steps, 0.0, GROK_JUMP),
            ("fullbatch-clean", FULLBATCH_SEEDS, digits_full_batch, FULL.steps, 0.0, None),
        ]
        full_batch += [
            ("fullbatch-noisy", FULLBATCH_NOISY_SEEDS,
             lambda s, z=z: digits_full_batch(s, noise=z), FULL.steps, z, None)
            for z in FULLBATCH_NOISES
        ]  # fmt: skip
    for kind, kind_seeds, make, steps, noise, until in full_batch:
        for seed in kind_seeds:
            jobs.append((f"{kind} {seed}" + (f" noise {noise:g}" if noise else ""), kind, lambda m=make, s=seed, k=kind, n=steps, z=noise, u=until: run_task(
                m(s), k, n, redis.url, **FULL_BATCH_RUN, noise=z, until_accuracy=u)))  # fmt: skip
    if args.rerun:
        jobs = [(label, kind, job) for label, kind, job in jobs if kind == args.rerun]
        if not jobs:
            parser.error(f"--rerun {args.rerun}: no runs of that kind in the plan")
    try:
        records += [timed(label, job) for label, _, job in jobs]
    finally:
        redis.stop()
    seconds = time.perf_counter() - started
    if args.rerun:
        # Keep every other run of the saved records; their command and time are kept too.
        with open(saved_records, "rb") as fh:
            saved = pickle.load(fh)
        kept = [r for r in saved["records"] if r.kind != args.rerun]
        replaced = [r for r in saved["records"] if r.kind == args.rerun]
        records = kept + records
        # A repeated rerun of the same kind replaces the earlier one: name it once (whole
        # commands compare: `--rerun grokking` must not match `--rerun grokking-heldout`).
        earlier = [c for c in saved["command"].split("`, then `") if c != command]
        command = "`, then `".join([*earlier, command])
        # The replaced runs' time goes out with them (records saved before runs carried
        # their own time count 0, so such a total still includes them).
        seconds += saved["seconds"] - sum(r.seconds for r in replaced)
    # The raw records, so the report can be rebuilt (and candidates added) without training.
    (out / "out").mkdir(parents=True, exist_ok=True)
    with open(out / "out" / "records.pkl", "wb") as fh:
        pickle.dump({"records": records, "command": command, "seconds": seconds}, fh)
    report = write_report(records, out, command, seconds)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
