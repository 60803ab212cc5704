"""Replay the grokking runs' recorded signal excess through the onset rule at other windows.

The signal score's window (``OnsetSettings.signal_window``) was chosen this way: the excess
each emitted step published does not depend on the window, so one recorded run answers for
every window. Reads the records ``make experiments`` saved::

    python -m experiments.signal_window [--records experiments/out/records.pkl] [200 400 800]
"""

from __future__ import annotations

import argparse
import pickle
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from experiments.run_all import DEFAULTS, grokking_verdict
from experiments.runner import RunRecord
from monitor_agent.memorization import MemorizationTracker


def replay(rec: RunRecord, window: int) -> list[dict[str, Any]]:
    """The alarm events the agent would have published with this signal window."""
    settings = replace(DEFAULTS, score="signal", signal_window=window)
    tracker = MemorizationTracker(0.0, None, settings)
    events: list[dict[str, Any]] = []
    for step, excess in zip(*rec.series("memorization/signal_excess"), strict=True):
        tracker.observe_excess(excess, step)
        # The training loss is not replayed: the rule arms whenever the score is high,
        # as it did live on these runs, whose loss was still falling at each arming.
        events += tracker.step_onset(step)
    return events


def main(argv: list[str] | None = None) -> int:
    """Print, per window, each grokking run's replayed events and the verdicts over all."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("windows", nargs="*", type=int, default=[200, 400, 600, 800])
    parser.add_argument("--records", default=str(Path(__file__).parent / "out" / "records.pkl"))
    args = parser.parse_args(argv)
    with open(args.records, "rb") as fh:
        runs = [r for r in pickle.load(fh)["records"] if r.kind == "grokking"]
    if not runs:
        parser.error(f"{args.records}: no grokking runs")
    for window in args.windows:
        verdicts = []
        print(f"signal window {window} steps")
        for rec in runs:
            events = replay(rec, window)
            v = grokking_verdict(replace(rec, events=events))
            verdicts.append(v)
            history = ", ".join(f"{e['kind'].split('_')[1]} {e['step']}" for e in events)
            print(
                f"  {rec.name}: {history or 'no alarm'} (held-out 50 % at {v['rising'] or '—'}, "
                f"90 % at {v['jump'] or '—'}; target {'met' if v['met'] else 'not met'})"
            )
        n = len(verdicts)
        print(
            f"  target met {sum(v['met'] for v in verdicts)}/{n}; cleared for a moment and "
            f"fired again in {sum(v['blips'] > 0 for v in verdicts)}/{n}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
