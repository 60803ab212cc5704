"""experiments.leave_batch_out: the leave-batch-out study of a held-out stand-in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from experiments.leave_batch_out import WARMUP, Study, main, probe_loss, study
from experiments.tasks import digits_label_noise


def test_the_running_sum_and_the_turn_follow_the_change() -> None:
    # Falls for 600 steps, then rises: the sum bottoms out at step 599 and the mean over
    # 100 steps turns non-negative once a window holds at most as many falls as rises.
    s = Study("digits noise=10% seed=0", 0.1, change=[-1.0] * 600 + [1.0] * 600)
    assert s.sum_minimum() == 599
    assert s.turn(100) == 550
    assert Study("x", 0.1, change=[-1.0] * 1000).turn(100) is None
    early = Study("x", 0.1, change=[1.0] * 1000)
    assert early.turn(100) == WARMUP  # nothing before the warm-up counts


def test_the_held_out_minimum_and_whether_it_is_clear() -> None:
    s = Study("x", 0.1, eval_steps=[0, 10, 20, 30], test_loss=[2.0, 1.0, 1.2, 1.3])
    assert s.held_out_minimum() == (10, True)
    flat = Study("x", 0.1, eval_steps=[0, 10, 20, 30], test_loss=[2.0, 1.0, 1.05, 1.05])
    assert flat.held_out_minimum() == (10, False)


def test_a_short_run_measures_the_examples_off_the_batch() -> None:
    task = digits_label_noise(0.2, 0, n_train=300)
    assert task.indices is not None
    rec = study(task, 0.2, 30)
    assert len(rec.change) == 30 and rec.eval_steps == [0, 10, 20]
    # Early in training a step on 64 of the examples lowers the loss on the others too.
    assert sum(rec.change) < 0
    x, y = task.train_x, task.train_y
    assert x is not None and y is not None
    loss = probe_loss(task.model, x[:8], y[:8])
    assert loss.shape == (8,) and not loss.requires_grad and task.model.training


def test_indices_draw_what_batch_draws() -> None:
    a, b = digits_label_noise(0.1, 3), digits_label_noise(0.1, 3)
    assert a.indices is not None and a.train_x is not None
    idx = a.indices(0)
    x, _ = b.batch(0)
    assert torch.equal(a.train_x[idx], x)


def test_the_command_writes_its_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lbo.md"
    argv = ["--tasks", "digits", "--noises", "0.4", "--seeds", "0", "--steps", "320",
            "--window", "50", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = out.read_text()
    assert "| digits noise=40% seed=0 |" in text and text in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--tasks", "imagenet"])
    with pytest.raises(SystemExit):
        main(["--steps", "100"])
