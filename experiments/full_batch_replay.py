"""Replay the recorded full-batch runs through variants of the agent's tracker and count,
per variant, the runs that meet their target (grokking: the grokking target; clean
labels: no alarm; label noise: onset within ×1.5 of the held-out minimum).

The replay feeds what the agent published (signal excess every 10 steps, probe summaries
every 50) and the training loss recorded every 20 steps (live, the agent sees every
step), so its counts can differ a little from the live ones. The scripts that compare
variants (experiments/descent_weighting.py, experiments/full_batch_scores.py) name them
and call :func:`compare`.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Callable
from pathlib import Path

from experiments.run_all import (
    DEFAULTS,
    FULL_BATCH_KINDS,
    _fmt,
    alarm_history,
    full_batch_verdict,
)
from experiments.runner import RunRecord, probe_summaries, replay_tracker
from monitor_agent.memorization import MemorizationTracker

RECORDS = str(Path(__file__).parent / "out" / "records.pkl")
# A variant makes a fresh tracker for one run (given the run).
Variant = Callable[[RunRecord], MemorizationTracker]


def judge(rec: RunRecord, tracker: MemorizationTracker) -> tuple[str, bool, str]:
    """(group, target met, one printed line) for one run replayed through ``tracker``."""
    events = replay_tracker(rec, tracker)
    group, ok = full_batch_verdict(rec, events)
    # The disagreeing share itself (not smoothed) at the first probe after warm-up.
    after = [
        t.disagree for s, t in sorted(probe_summaries(rec).items()) if s >= DEFAULTS.warmup_steps
    ]
    line = (
        f"  {rec.name}: E_fit {_fmt(tracker.descent_excess(), 3)}, share after warm-up "
        f"{_fmt(after[0] if after else None, 3)}, H_ref {_fmt(tracker.h_ref, 3)}, alarm: "
        f"{alarm_history(events) or 'none'}"
    )
    return group, ok, line + (", met" if ok else ", not met")


def load_runs(parser: argparse.ArgumentParser, path: str) -> list[RunRecord]:
    """The full-batch runs of the saved records (a parser error when there are none)."""
    with open(path, "rb") as fh:
        runs = [r for r in pickle.load(fh)["records"] if r.kind in FULL_BATCH_KINDS]
    if not runs:
        parser.error(f"{path}: no full-batch runs (run the --rerun kinds first)")
    return runs


def compare(runs: list[RunRecord], variants: dict[str, Variant]) -> dict[str, dict[str, int]]:
    """Print every variant's per-run verdicts and its counts per group; returns the counts
    met per group and variant."""
    met: dict[str, dict[str, int]] = {}
    for name, make in variants.items():
        print(name)
        counts: dict[str, list[bool]] = {}
        for rec in runs:
            group, ok, line = judge(rec, make(rec))
            counts.setdefault(group, []).append(ok)
            print(line)
        print("  " + ", ".join(f"{g} {sum(v)}/{len(v)}" for g, v in counts.items()))
        met[name] = {g: sum(v) for g, v in counts.items()}
    return met


def replay_main(argv: list[str] | None, description: str, variants: dict[str, Variant]) -> int:
    """A replay script's command line: ``--records PATH``, then :func:`compare`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--records", default=RECORDS)
    args = parser.parse_args(argv)
    compare(load_runs(parser, args.records), variants)
    return 0
