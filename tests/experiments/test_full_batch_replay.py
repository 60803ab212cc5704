"""The full-batch replays: the score variants, their verdicts and the scripts."""

from __future__ import annotations

import math
import pickle
from dataclasses import replace
from pathlib import Path

import pytest

from experiments import descent_weighting, full_batch_scores
from experiments.full_batch_replay import compare
from experiments.full_batch_scores import LeftChanceTracker, classes_of
from experiments.run_all import (
    DEFAULTS,
    FULL_BATCH_DEFAULT,
    FULL_BATCH_VARIANTS,
    _recorded_with_other_score,
    full_batch_comparison,
    full_batch_verdict,
)
from experiments.runner import RunRecord, replay_tracker
from monitor_agent.memorization import MemorizationTracker, TailStatistics


def _memorizing(name: str, kind: str, noise: float, spike: bool = False) -> RunRecord:
    """A full-batch run fitted with shared signal (the excess 0.6 over its whole fall, so
    the signal score stays 0) whose probe disagreement falls from 0.2 after warm-up; with
    ``spike`` the disagreement instead comes only with a training-loss spike at 400–440."""
    rec = RunRecord(name, kind, noise=noise)
    rec.steps = list(range(0, 1001, 20))
    rec.train_loss = [2.0 * 0.995**s for s in rec.steps]
    rec.test_loss = [1.0 + abs(s - 300) / 1000 for s in rec.steps]  # minimum at 300
    rec.agent["memorization/signal_excess"] = [(s, 0.6) for s in range(0, 1001, 10)]
    probe = range(0, 1001, 50)
    if spike:
        for i, s in enumerate(rec.steps):
            if 400 <= s <= 440:
                rec.train_loss[i] = 3.0
        share = [0.2 if 400 <= s <= 440 else 0.0 for s in probe]
    else:
        share = [0.2 if s <= 200 else max(0.0, 0.2 - 0.002 * (s - 200)) for s in probe]
    rec.agent["memorization/disagree_fraction"] = list(zip(probe, share, strict=True))
    rec.agent["memorization/probe_loss_median"] = [(s, 0.1) for s in probe]
    return rec


def test_the_tail_beside_the_signal_catches_a_fit_reached_with_signal() -> None:
    rec = _memorizing("digits full batch noise=10% seed=0", "fullbatch-noisy", 0.1)
    table = full_batch_comparison([rec])
    head = table.index("| score | noisy 10% |")
    rows = table[head + 2 : head + 2 + len(FULL_BATCH_VARIANTS)]
    assert rows[0].startswith("| signal (the agent's) |") and rows[0].endswith("| 0/1 |")
    assert all(row.endswith("| 1/1 |") for row in rows[1:])
    # The reference the agent's variant took, against the tail's floor.
    assert "by group: noisy 10% 0.200–0.200. Below 0.05 the tail score is 0." in table[-1]
    assert full_batch_verdict(rec, []) == ("noisy 10%", False)
    onset = [{"kind": "memorization_onset", "step": 300}]
    assert full_batch_verdict(rec, onset) == ("noisy 10%", True)
    clean = RunRecord("digits full batch seed=0", "fullbatch-clean")
    assert full_batch_verdict(clean, []) == ("clean", True)
    assert full_batch_verdict(clean, onset) == ("clean", False)


def test_a_spike_s_disagreement_is_no_reference_at_a_training_loss_low() -> None:
    rec = _memorizing("digits full batch seed=1", "fullbatch-clean", 0.0, spike=True)
    met = compare([rec], full_batch_scores.VARIANTS)
    peak, at_low = (
        met["signal or tail, H_ref = peak"],
        met["signal or tail, H_ref = peak at a training-loss low"],
    )
    assert peak == {"clean": 0}  # the spike's disagreement, refitted, fires the alarm
    assert at_low == {"clean": 1}


def test_the_scripts_replay_saved_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "records.pkl"
    runs = [_memorizing("digits full batch noise=10% seed=0", "fullbatch-noisy", 0.1),
            RunRecord("digits noise=10% seed=0", "digits")]  # fmt: skip
    with open(path, "wb") as fh:
        pickle.dump({"records": runs, "command": "test", "seconds": 0.0}, fh)
    assert full_batch_scores.main(["--records", str(path)]) == 0
    out = capsys.readouterr().out
    assert "digits full batch noise=10% seed=0" in out and "noisy 10% 1/1" in out
    assert "digits noise=10% seed=0" not in out  # mini-batch runs are not replayed
    assert descent_weighting.main(["--records", str(path)]) == 0
    assert "falls weighted by log-loss" in capsys.readouterr().out
    with open(path, "wb") as fh:
        pickle.dump({"records": runs[1:], "command": "test", "seconds": 0.0}, fh)
    with pytest.raises(SystemExit):
        full_batch_scores.main(["--records", str(path)])


def test_runs_recorded_with_another_score_are_replayed_with_the_default() -> None:
    rec = _memorizing("grokking p=53 seed=0", "grokking", 0.0)
    assert _recorded_with_other_score([rec]) == []  # no events: nothing to compare
    rec.events = [{"kind": "memorization_onset", "step": 300,
                   "data": {"score_kind": "signal_or_tail"}}]  # fmt: skip
    # The signal score never fires on this run (its fit came with shared signal).
    assert _recorded_with_other_score([rec]) == [
        "  1 of these runs were recorded with the score signal_or_tail as the default; "
        "replayed with the signal score (the default), 0/1 give the same alarm events as live."
    ]
    # A fit against the examples' shared signal: the signal score fires at the warm-up's
    # end, as the recorded alarm did.
    memorized = _memorizing("grokking p=53 seed=1", "grokking", 0.0)
    memorized.agent["memorization/signal_excess"] = [(s, -0.3) for s in range(0, 1001, 10)]
    live = replay_tracker(memorized, MemorizationTracker(0.0, None, FULL_BATCH_DEFAULT))
    assert [e["step"] for e in live] == [DEFAULTS.warmup_steps]
    memorized.events = [{**e, "data": {"score_kind": "signal_or_tail"}} for e in live]
    assert "2 of these runs" in _recorded_with_other_score([rec, memorized])[0]
    assert "1/2 give the same alarm events" in _recorded_with_other_score([rec, memorized])[0]


def test_the_share_is_smoothed_only_once_the_probe_left_chance() -> None:
    settings = replace(DEFAULTS, score="signal_or_tail", ema_steps=1)
    tracker = LeftChanceTracker(0.0, math.log(10), settings)
    tracker.observe_tail(TailStatistics(2.5, 3.0, 3.0, 0.75), 0, 0)  # at chance: skipped
    assert tracker.h_bar is None
    tracker.observe_tail(TailStatistics(1.0, 2.0, 3.0, 0.1), 50, 50)
    assert tracker.h_bar == pytest.approx(0.1)
    tracker.observe_tail(TailStatistics(2.5, 3.0, 3.0, 0.5), 50, 100)  # once started, kept
    assert tracker.h_bar == pytest.approx(0.5)
    assert classes_of(RunRecord("grokking p=53 seed=3", "grokking")) == 53
    assert classes_of(RunRecord("digits full batch seed=0", "fullbatch-clean")) == 10
