"""Replay the grokking runs' recorded signal excess through the onset rule at other windows
and scales.

The signal score's window and scale (``OnsetSettings.signal_window``, ``signal_scale``) were
chosen this way: the excess each emitted step published does not depend on either, so one
recorded run answers for every setting. Reads the records ``make experiments`` saved::

    python -m experiments.signal_window [--records experiments/out/records.pkl]
        [--scales 0.1,0.25] [--kind grokking] [200 400 800]

It also prints, per run, the levels the scale was placed between: the highest median
excess on the memorization plateau and the lowest once held-out accuracy has passed 90 %.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from dataclasses import replace
from pathlib import Path

from experiments.run_all import DEFAULTS, _fmt, alarm_history, excess_levels, grokking_verdict
from experiments.runner import replay


def main(argv: list[str] | None = None) -> int:
    """Print, per scale and window, each grokking run's replayed events and the verdicts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("windows", nargs="*", type=int, default=[200, 400, 600, 800])
    parser.add_argument("--records", default=str(Path(__file__).parent / "out" / "records.pkl"))
    parser.add_argument(
        "--scales",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[DEFAULTS.signal_scale],
        help="comma-separated signal scales (default: the agent's)",
    )
    parser.add_argument(
        "--kind", default="grokking", help="grokking (seeds 0–4) or grokking-heldout (5–14)"
    )
    args = parser.parse_args(argv)
    with open(args.records, "rb") as fh:
        runs = [r for r in pickle.load(fh)["records"] if r.kind == args.kind]
    if not runs:
        parser.error(f"{args.records}: no {args.kind} runs")
    print(f"median excess over {DEFAULTS.signal_window} steps: plateau max, after-90 % min")
    for rec in runs:
        high, low = excess_levels(rec, DEFAULTS.signal_window)
        print(f"  {rec.name}: {_fmt(high, 3)}, {_fmt(low, 3)}")
    for scale in args.scales:
        for window in args.windows:
            verdicts = []
            print(f"signal scale {scale:g}, window {window} steps")
            for rec in runs:
                events = replay(rec, window, scale)
                v = grokking_verdict(replace(rec, events=events))
                verdicts.append(v)
                history = alarm_history(events)
                print(
                    f"  {rec.name}: {history or 'no alarm'} (held-out 50 % at "
                    f"{v['rising'] or '—'}, 90 % at {v['jump'] or '—'}; target "
                    f"{'met' if v['met'] else 'not met'})"
                )
            n = len(verdicts)
            print(
                f"  target met {sum(v['met'] for v in verdicts)}/{n}; cleared for a moment and "
                f"fired again in {sum(v['blips'] > 0 for v in verdicts)}/{n}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
