from __future__ import annotations

from pathlib import Path

from experiments.run_all import best_constant_step, main
from experiments.runner import RunRecord


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
