"""experiments.tail_threshold: the replay with a threshold that follows the peak."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from experiments.runner import RunRecord
from experiments.tail_threshold import LOW, group_of, main, replay, score_at_minimum


def _run(name: str, kind: str, noise: float, peak: float, minimum: int = 1200) -> RunRecord:
    """A run whose disagreeing share rises to ``peak`` by step 300 and falls linearly to
    0 by step 2,300, with a clear held-out minimum at ``minimum``."""
    rec = RunRecord(name, kind, noise=noise)
    rec.steps = list(range(0, 3001, 10))
    rec.train_loss = [2.0 / (1 + s / 100) for s in rec.steps]
    rec.test_loss = [1.0 + 0.5 * abs(s - minimum) / 3000 for s in rec.steps]
    probe = range(0, 3001, 50)
    share = [peak * min(1.0, s / 300) if s <= 300 else peak * max(0.0, (2300 - s) / 2000)
             for s in probe]  # fmt: skip
    rec.agent["memorization/disagree_fraction"] = list(zip(probe, share, strict=True))
    rec.agent["memorization/probe_loss_median"] = [(s, 0.1) for s in probe]
    return rec


def test_the_threshold_follows_the_peak_and_a_higher_one_fires_later() -> None:
    rec = _run("digits noise=10% seed=0", "digits", 0.1, peak=0.2)
    tracker, _ = replay(rec, 0.8, 1.0)
    assert tracker.h_ref == pytest.approx(0.2, rel=0.1)  # the peak of an EMA of the share
    assert tracker.rule is not None
    assert tracker.rule.theta_on == pytest.approx(0.8 - tracker.h_ref)  # clip(a − b·H_ref)
    assert replay(rec, 0.0, 0.0)[0].rule.theta_on == LOW  # type: ignore[union-attr]
    early, late = replay(rec, 0.5, 0.0)[1], replay(rec, 0.8, 0.0)[1]
    assert early is not None and late is not None and late > early
    score, h_ref = score_at_minimum(tracker, 1200)
    assert h_ref == tracker.h_ref
    assert 0.3 < score < 0.6  # the share has fallen by about 0.45 of its peak at step 1,200


def test_runs_are_grouped_by_what_they_tune_and_check() -> None:
    assert group_of(_run("digits noise=10% seed=1", "digits", 0.1, 0.2)) == "tuning"
    assert group_of(_run("digits noise=10% seed=4", "digits-validation", 0.1, 0.2)) == "check"
    assert group_of(_run("digits CNN noise=10% seed=0", "digits-cnn", 0.1, 0.2)) == "tuning"
    assert group_of(_run("mixture noise=40% seed=2", "mixture", 0.4, 0.4)) == "check"
    assert group_of(_run("mixture noise=0% seed=2", "mixture", 0.0, 0.0)) == "control"
    assert group_of(_run("grokking p=53 seed=0", "grokking", 0.0, 0.0)) == ""
    flat = _run("digits noise=20% seed=0", "digits", 0.2, 0.3)
    flat.test_loss = [1.0] * len(flat.steps)  # no clear minimum: not judged
    assert group_of(flat) == ""


def test_the_command_replays_saved_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [_run("digits noise=10% seed=0", "digits", 0.1, 0.2),
            _run("digits noise=0% seed=0", "digits", 0.0, 0.02)]  # fmt: skip
    other = [_run("mixture noise=10% seed=1", "mixture", 0.1, 0.15)]
    for name, recs in (("records.pkl", runs), ("other.pkl", other)):
        with open(tmp_path / name, "wb") as fh:
            pickle.dump({"records": recs, "command": "test", "seconds": 0.0}, fh)
    args = ["--records", str(tmp_path / "records.pkl"), "--other", str(tmp_path / "other.pkl")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| digits noise=10% seed=0 | tuning | 0.19 |" in out
    # the held-out loss (1 + 0.5·|s − 1200|/3000) at the onset and at step 3,000, over 1.0
    _, onset = replay(runs[0], 0.5, 0.0)
    assert onset is not None
    assert (
        f"| {onset} | {onset / 1200:.2f} | {1 + 0.5 * abs(onset - 1200) / 3000:.2f} | 1.30 |" in out
    )
    assert "Held-out loss over its minimum, stopping at the default onset" in out
    assert "| mixture noise=10% seed=1 | check |" in out
    assert "| default: 0.5 |" in out and "chosen: clip(" in out
    with pytest.raises(SystemExit):
        main(["--records", str(tmp_path / "missing.pkl"), "--other", str(tmp_path / "other.pkl")])
