"""Replay the recorded full-batch runs with the tail score beside the signal score.

On full batch with an exact estimator the agent's score is the signal score, and with
10 % label noise it never fires (experiments/REPORT.md): the fit is reached mostly with
shared signal, which holds the descent factor at 0. The tail score, computed on the same
runs, fires on the noisy runs and not on the clean ones, but it follows the training-loss
spikes of grokking, where the probe's disagreement comes back with every spike. This
script replays, per run, the agent's signal score alone and the larger of the two scores
(``score="signal_or_tail"``) with the tail's reference H_ref taken

* as the mini-batch default does: the largest H̄ after warm-up (``reference="peak"``);
* only from probes taken while the training loss is at its lowest so far
  (``reference="peak_at_low"``): a spike's disagreement re-covers ground already
  covered, the same reason the descent factor counts only falls to new lows;
* the same, with the disagreeing share smoothed only from the first probe whose median
  loss is below the chance level ln C (``LeftChanceTracker``): the smoothed share
  otherwise carries the untrained network's chance-level disagreement into the
  reference, which is why ``signal_or_tail`` is not the default (docs/concepts.md).

    python -m experiments.full_batch_scores [--records experiments/out/records.pkl]

It prints each variant's verdicts per run and its counts per group (see
experiments/full_batch_replay.py for the targets and for how the replay differs from a
live run).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import replace

from experiments.full_batch_replay import Variant, replay_main
from experiments.run_all import DEFAULTS, FULL_BATCH_VARIANTS
from experiments.runner import RunRecord
from monitor_agent.memorization import MemorizationTracker, OnsetSettings, TailStatistics


class LeftChanceTracker(MemorizationTracker):
    """The tracker with the disagreeing share's smoothing started only at the first probe
    whose median loss is below the chance level ln C: before that the network sits at
    chance, and its "disagreement" says nothing about the labels."""

    def observe_tail(self, tail: TailStatistics, steps: int, step: int) -> None:
        """Skip probes until the median loss first falls below chance (H̄ starts there)."""
        assert self.chance_loss is not None
        if self.h_bar is None and tail.median >= self.chance_loss:
            return
        super().observe_tail(tail, steps, step)


def classes_of(rec: RunRecord) -> int:
    """The number of classes of a full-batch run's task: p for grokking mod p, else 10."""
    found = re.search(r"grokking p=(\d+)", rec.name)
    return int(found.group(1)) if found else 10


def _variant(settings: OnsetSettings) -> Variant:
    return lambda _: MemorizationTracker(0.0, None, settings)


VARIANTS = {label: _variant(settings) for label, settings in FULL_BATCH_VARIANTS.items()}
VARIANTS["signal or tail, H_ref = peak at a training-loss low, H̄ from leaving chance"] = (
    lambda rec: LeftChanceTracker(
        0.0, math.log(classes_of(rec)), replace(DEFAULTS, score="signal_or_tail")
    )
)


def main(argv: list[str] | None = None) -> int:
    """Print each variant's replayed verdicts and their counts per group."""
    return replay_main(argv, __doc__.splitlines()[0], VARIANTS)


if __name__ == "__main__":
    sys.exit(main())
