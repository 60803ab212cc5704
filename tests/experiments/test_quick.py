from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from experiments.demo_alarm import loss_spikes
from experiments.descent_weighting import LogFallTracker
from experiments.run_all import (
    DEFAULTS,
    _grokking_lines,
    _levels_line,
    best_constant_step,
    excess_levels,
    grokking_verdict,
    main,
)
from experiments.runner import RunRecord, replay, replay_tracker, run_task
from experiments.tasks import digits_full_batch
from monitor_agent.memorization import MemorizationTracker


def test_quick_experiments_write_a_report_with_figures(tmp_path: Path) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "REPORT.md").read_text()
    assert "## Candidates against the targets" in report
    assert "digits noise=20% seed=0" in report
    assert "fresh data seed=0" in report
    assert "**met**" in report or "**not met**" in report
    figures = list((tmp_path / "figures").glob("*.png"))
    assert len(figures) == 3
    assert "### Does the alarm follow the run, or would a fixed step do?" in report


def _run_with_minimum_at(step: int, last: int = 3000) -> RunRecord:
    rec = RunRecord(f"min at {step}", "digits", noise=0.2)
    rec.steps = list(range(0, last + 1, 10))
    rec.test_loss = [1.0 + abs(s - step) / last for s in rec.steps]
    return rec


def test_best_constant_step_is_the_earliest_step_hitting_most_minima() -> None:
    runs = [_run_with_minimum_at(m) for m in (400, 600, 900, 2400)]
    # ×1.5 windows: [267, 600], [400, 900], [600, 1350], [1600, 3600]; 600 is in three.
    assert best_constant_step(runs) == 600
    assert best_constant_step([]) is None


def test_grokking_verdict_needs_an_alarm_on_the_plateau_and_a_clear_near_the_jump() -> None:
    rec = RunRecord("grok", "grokking")
    rec.steps = list(range(0, 5001, 20))
    rec.train_loss = [4.0 if s < 150 else 0.01 for s in rec.steps]  # fitted at 160
    # held-out accuracy: 50 % at 3,500, 90 % at 4,000
    rec.test_acc = [0.3 if s < 3500 else 0.6 if s < 4000 else 0.95 for s in rec.steps]

    def events(*pairs: tuple[str, int]) -> list[dict[str, object]]:
        return [
            {"kind": f"memorization_{k}", "step": s, "data": {"score_kind": "signal"}}
            for k, s in pairs
        ]

    rec.events = events(("onset", 200), ("cleared", 3700))
    v = grokking_verdict(rec)
    assert (v["fitted"], v["rising"], v["jump"]) == (160, 3500, 4000)
    assert v["met"] and v["score"] == "signal"
    assert v["settled"] == 3700 and v["settles_at_rise"]  # 3,700 is within 20 % of 3,500
    assert v["acc_at_clear"] == 0.6  # the best evaluation at or before 3,700
    dip = list(rec.test_acc)
    dip[rec.steps.index(3680)] = 0.1  # a spike pulls the last evaluation before the clear
    assert grokking_verdict(replace(rec, test_acc=dip))["acc_at_clear"] == 0.6
    rec.events = events(("onset", 3600), ("cleared", 3900))  # fires after the plateau
    assert not grokking_verdict(rec)["fires_on_plateau"]
    rec.events = events(("onset", 200), ("cleared", 1000), ("onset", 1100))  # clears early
    v = grokking_verdict(rec)
    assert v["fires_on_plateau"] and not v["clears_at_jump"] and not v["met"]
    assert v["settled"] is None and not v["settles_at_rise"]  # the alarm is on at the end
    assert v["blips"] == 1  # cleared at 1,000 and fired again at 1,100
    assert v["acc_at_clear"] == 0.3  # the first clear, still on the plateau
    rec.events = events(("onset", 200))
    assert grokking_verdict(rec)["acc_at_clear"] is None  # never cleared


def test_signal_window_replay_rides_out_a_short_plateau_excursion_only_with_a_long_window() -> None:
    rec = RunRecord("grok", "grokking")
    rec.steps = list(range(0, 5001, 20))
    rec.train_loss = [4.0 if s < 150 else 0.01 for s in rec.steps]
    rec.test_acc = [0.3 if s < 3000 else 0.95 for s in rec.steps]
    # Excess at chance on the plateau, a 300-step excursion at 1,000, signal from 3,000 on.
    emitted = range(0, 5001, 10)
    excess = [0.4 if 1000 <= s < 1300 or s >= 3000 else 0.0 for s in emitted]
    rec.agent["memorization/signal_excess"] = list(zip(emitted, excess, strict=True))
    short = [(e["kind"], e["step"]) for e in replay(rec, 200)]
    assert [k for k, _ in short] == [
        "memorization_onset", "memorization_cleared", "memorization_onset", "memorization_cleared"
    ]  # fmt: skip
    long = [(e["kind"], e["step"]) for e in replay(rec, 800)]
    assert long[0] == ("memorization_onset", 200)
    # The median over 800 steps passes 0.225 once more than half the window is signal.
    assert [k for k, _ in long] == ["memorization_onset", "memorization_cleared"]
    assert 3400 <= long[1][1] <= 3500


def test_grokking_report_counts_runs_that_never_pass_90_percent_apart() -> None:
    rec = RunRecord("grok never", "grokking-heldout")
    rec.steps = list(range(0, 3001, 20))
    rec.train_loss = [4.0 if s < 150 else 0.01 for s in rec.steps]
    rec.test_acc = [0.3 if s < 2000 else 0.6 for s in rec.steps]  # never reaches 90 %
    rec.events = [{"kind": "memorization_onset", "step": 200, "data": {"score_kind": "signal"}}]
    lines = _grokking_lines([rec], "held-out seeds")
    summary = lines[-1]
    assert "**0/1** (0/0 of the runs whose held-out accuracy passed 90 %" in summary
    assert "never passed 90 % in 1 run(s); the alarm was still on at the end in 1" in summary


def test_excess_levels_are_the_plateau_high_and_the_generalized_low() -> None:
    rec = RunRecord("grok", "grokking")
    rec.steps = list(range(0, 6001, 20))
    rec.train_loss = [4.0 if s < 150 else 0.01 for s in rec.steps]  # fitted at 160
    rec.test_acc = [0.3 if s < 3000 else 0.95 for s in rec.steps]  # 50 % and 90 % at 3,000
    emitted = range(0, 6001, 10)
    excess = [0.05 if s < 3000 else 0.4 for s in emitted]
    excess[100] = 0.9  # one spike on the plateau (step 1,000) does not move an 800-step median
    rec.agent["memorization/signal_excess"] = list(zip(emitted, excess, strict=True))
    high, low = excess_levels(rec, 800)
    assert high == 0.05 and low == 0.4
    line = _levels_line([rec])
    assert "clear level E ≥ 0.225" in line
    assert "highest on a plateau is 0.05 (grok), and 0 of 1 plateaus reach" in line
    assert "passed 90 % is 0.40 (grok), below the clear level in 0 of 1 runs." in line


def test_full_batch_digits_trains_on_the_whole_clean_training_set_every_step() -> None:
    task = digits_full_batch(seed=0, n_train=300)
    x0, y0 = task.batch(0)
    x1, _ = task.batch(1)
    assert task.train_x is not None and task.train_y is not None
    assert x0.shape[0] == task.batch_size == task.dataset_size == 300
    assert x0 is x1 and torch.equal(y0, task.train_y)
    assert task.noisy is None and "full batch" in task.name


def test_loss_spikes_are_the_starts_of_stretches_above_the_level_after_the_fit() -> None:
    rec = RunRecord("r", "grokking")
    rec.steps = [0, 10, 20, 30, 40, 50, 60, 70]
    rec.train_loss = [4.0, 0.01, 2.0, 3.0, 0.02, 0.5, 1.5, 0.01]
    # The loss at step 0 is before the fit; 20–30 is one stretch, 60 another.
    assert loss_spikes(rec, after=10) == [20, 60]
    assert loss_spikes(rec, after=10, level=2.5) == [30]


def test_a_run_until_an_accuracy_stops_at_1_3_times_the_step_it_first_reaches_it(
    redis_url: str,
) -> None:
    # Full-batch digits pass 95 % held-out accuracy within a few hundred Adam steps.
    task = digits_full_batch(seed=0, n_train=300)
    rec = run_task(task, "fullbatch-clean", 2000, redis_url, eval_every=20, until_accuracy=0.95)
    reached = next(s for s, a in zip(rec.steps, rec.test_acc, strict=True) if a >= 0.95)
    assert 100 < reached < 1500
    # The last evaluation lies within one evaluation period before the stop.
    assert math.ceil(1.3 * reached) - 20 <= rec.steps[-1] < math.ceil(1.3 * reached)
    steps, _ = rec.series("memorization/score")
    assert steps and max(steps) < math.ceil(1.3 * reached)


def test_a_rerun_without_saved_records_stops_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--rerun", "fresh", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "--rerun needs the records of an earlier full run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_log_fall_weighting_counts_each_decade_of_the_loss_alike() -> None:
    rec = RunRecord("fb", "fullbatch-noisy")
    rec.steps = [0, 20, 40]
    rec.train_loss = [2.0, 0.2, 0.002]  # one decade with signal, then two without
    rec.agent["memorization/signal_excess"] = [(0, 0.0), (20, 0.6), (40, -0.3)]
    by_loss = MemorizationTracker(0.0, None, replace(DEFAULTS, score="signal"))
    by_log = LogFallTracker(0.0, None, replace(DEFAULTS, score="signal"))
    replay_tracker(rec, by_loss)
    replay_tracker(rec, by_log)
    fit_loss, fit_log = by_loss.descent_excess(), by_log.descent_excess()
    assert fit_loss is not None and fit_log is not None
    # Loss units: (1.8·0.6 − 0.198·0.3)/1.998; log-loss: (0.6·ln 10 − 0.3·ln 100)/ln 1000 = 0.
    assert math.isclose(fit_loss, (1.8 * 0.6 - 0.198 * 0.3) / 1.998)
    assert abs(fit_log) < 1e-12
