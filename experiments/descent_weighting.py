"""Replay the recorded full-batch runs with the descent factor's falls weighted otherwise.

The signal score's descent factor averages the signal excess over the training loss's
falls to new lows, each weighted by its size in loss units (``MemorizationTracker.fall``).
The small memorized share of a 10 % label-noise full-batch run is fitted late, in falls
that are small in loss units, so it barely moves E_fit and the alarm never fires there.
This script asks whether weighting falls by their size in log-loss instead would catch
it without firing on the clean runs. It reads the records ``make experiments`` and its
reruns saved::

    python -m experiments.descent_weighting [--records experiments/out/records.pkl]

It prints, per weighting and run, E_fit at the end, the first onset and whether the run
meets its target, then the counts per group (grokking: the grokking target; clean: no
alarm; noisy: onset within ×1.5 of the held-out minimum). The replay feeds the training
loss recorded every 20 steps (live, the agent sees every step), so its counts can differ
a little from the live ones.
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
from dataclasses import replace
from pathlib import Path

from experiments.run_all import DEFAULTS, _fmt, grokking_verdict, onset_hits
from experiments.runner import RunRecord, replay_tracker
from monitor_agent.memorization import MemorizationTracker

KINDS = ("grokking", "grokking-heldout", "fullbatch-clean", "fullbatch-noisy")


class LogFallTracker(MemorizationTracker):
    """The tracker with each fall weighted by log(low) − log(value)."""

    def fall(self, low: float, value: float) -> float:
        """The fall's size in log-loss (natural log; a loss of 0 counts as 1e-12)."""
        return math.log(max(low, 1e-12)) - math.log(max(value, 1e-12))


WEIGHTINGS: dict[str, type[MemorizationTracker]] = {
    "loss (the agent's)": MemorizationTracker,
    "log-loss": LogFallTracker,
}


def judge(rec: RunRecord, tracker_type: type[MemorizationTracker]) -> tuple[str, bool, str]:
    """(group, target met, one printed line) for one run replayed with ``tracker_type``."""
    settings = replace(DEFAULTS, score="signal")
    tracker = tracker_type(0.0, None, settings)
    events = replay_tracker(rec, tracker)
    onset = next((e["step"] for e in events if e["kind"] == "memorization_onset"), None)
    if rec.kind.startswith("grokking"):
        group, ok = "grokking", bool(grokking_verdict(replace(rec, events=events))["met"])
    elif rec.kind == "fullbatch-clean":
        group, ok = "clean", onset is None
    else:
        group, ok = f"noisy {rec.noise:.0%}", onset_hits(onset, rec.test_min_step())
    line = f"  {rec.name}: E_fit {_fmt(tracker.descent_excess(), 3)}, onset {_fmt(onset)}"
    return group, ok, line + (", met" if ok else ", not met")


def main(argv: list[str] | None = None) -> int:
    """Print each weighting's replayed verdicts and their counts per group."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", default=str(Path(__file__).parent / "out" / "records.pkl"))
    args = parser.parse_args(argv)
    with open(args.records, "rb") as fh:
        runs = [r for r in pickle.load(fh)["records"] if r.kind in KINDS]
    if not runs:
        parser.error(f"{args.records}: no full-batch runs (run the --rerun kinds first)")
    for name, tracker_type in WEIGHTINGS.items():
        print(f"falls weighted by {name}")
        counts: dict[str, list[bool]] = {}
        for rec in runs:
            group, ok, line = judge(rec, tracker_type)
            counts.setdefault(group, []).append(ok)
            print(line)
        print("  " + ", ".join(f"{g} {sum(v)}/{len(v)}" for g, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
