from __future__ import annotations

from pathlib import Path

from experiments.run_all import main


def test_quick_experiments_write_a_report_with_figures(tmp_path: Path) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "REPORT.md").read_text()
    assert "## Candidates against the targets" in report
    assert "digits noise=20% seed=0" in report
    assert "fresh data seed=0" in report
    assert "**met**" in report or "**not met**" in report
    figures = list((tmp_path / "figures").glob("*.png"))
    assert len(figures) == 3
