"""experiments.grokking_clear: where the grokking alarm clears on the held-out curves."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.grokking_clear import Clear, main, report
from experiments.runner import RunRecord


def _run() -> Clear:
    # Fitted at 10, a plateau at held-out loss 4 until accuracy passes 50 % at 40, the
    # minimum 0.25 at 60 where accuracy passes 90 %; the alarm clears at 50.
    steps = [0, 10, 20, 30, 40, 50, 60, 70]
    rec = RunRecord(
        "grokking p=53 seed=99",
        "grokking",
        steps=steps,
        test_loss=[4.0, 4.0, 4.0, 4.0, 2.0, 0.5, 0.25, 0.3],
        test_acc=[0.0, 0.0, 0.0, 0.1, 0.5, 0.8, 0.95, 0.95],
        train_loss=[3.0, 0.05, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
        events=[
            {"kind": "memorization_onset", "step": 20, "data": {"score_kind": "signal"}},
            {"kind": "memorization_cleared", "step": 50, "data": {"score_kind": "signal"}},
        ],
    )
    return Clear(rec, steps, [50.0, 40.0, 39.0, 38.0, 35.0, 32.0, 30.0, 30.0])


def test_shares_of_the_held_out_loss_and_norm_fall() -> None:
    c = _run()
    assert c.loss_levels() == (4.0, 0.25)
    # log(4/0.5) / log(4/0.25) = 3/4
    assert c.loss_share(50) == pytest.approx(0.75)
    assert c.loss_share(60) == pytest.approx(1.0)
    assert c.loss_share(None) is None
    # ‖θ‖ from 40 at the fit to 30 at the end: 32 is 80 % of the way.
    assert c.norm_share(50) == pytest.approx(0.8)
    assert c.at(55, c.rec.steps, c.rec.test_loss) == 0.5
    assert c.at(-1, c.rec.steps, c.rec.test_loss) is None


def test_the_report_lists_each_run_and_the_spans() -> None:
    text = report([_run()], "python -m experiments.grokking_clear", 60.0)
    row = next(line for line in text.splitlines() if line.startswith("| grokking p=53 seed=99"))
    # The clear at 50 is 10 steps (17 %) before the 90 % step at 60: the target is met.
    assert "| 10 | 40 | 60 | 50 | met | 80% |" in row
    assert "0.75 / 1.00" in row and "0.80 / 1.00" in row
    assert "**1/1**" in text
    assert "by the clear: 0.75–0.75 (median 0.75, n = 1)" in text


def test_the_command_writes_its_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gc.md"
    assert main(["--seeds", "15", "--steps", "60", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| grokking p=53 seed=15 |" in text and text in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--seeds", "a,b"])
