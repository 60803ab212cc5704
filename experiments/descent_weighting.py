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

import math
import sys
from dataclasses import replace

from experiments.full_batch_replay import Variant, replay_main
from experiments.run_all import DEFAULTS
from monitor_agent.memorization import MemorizationTracker


class LogFallTracker(MemorizationTracker):
    """The tracker with each fall weighted by log(low) − log(value)."""

    def fall(self, low: float, value: float) -> float:
        """The fall's size in log-loss (natural log; a loss of 0 counts as 1e-12)."""
        return math.log(max(low, 1e-12)) - math.log(max(value, 1e-12))


SIGNAL = replace(DEFAULTS, score="signal")
WEIGHTINGS: dict[str, Variant] = {
    "falls weighted by loss (the agent's)": lambda _: MemorizationTracker(0.0, None, SIGNAL),
    "falls weighted by log-loss": lambda _: LogFallTracker(0.0, None, SIGNAL),
}


def main(argv: list[str] | None = None) -> int:
    """Print each weighting's replayed verdicts and their counts per group."""
    return replay_main(argv, __doc__.splitlines()[0], WEIGHTINGS)


if __name__ == "__main__":
    sys.exit(main())
