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
  covered, the same reason the descent factor counts only falls to new lows.

    python -m experiments.full_batch_scores [--records experiments/out/records.pkl]

It prints each variant's verdicts per run and its counts per group (see
experiments/full_batch_replay.py for the targets and for how the replay differs from a
live run).
"""

from __future__ import annotations

import sys

from experiments.full_batch_replay import Variant, replay_main
from experiments.run_all import FULL_BATCH_VARIANTS
from monitor_agent.memorization import MemorizationTracker, OnsetSettings


def _variant(settings: OnsetSettings) -> Variant:
    return lambda: MemorizationTracker(0.0, None, settings)


VARIANTS = {label: _variant(settings) for label, settings in FULL_BATCH_VARIANTS.items()}


def main(argv: list[str] | None = None) -> int:
    """Print each variant's replayed verdicts and their counts per group."""
    return replay_main(argv, __doc__.splitlines()[0], VARIANTS)


if __name__ == "__main__":
    sys.exit(main())
