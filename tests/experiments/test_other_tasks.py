from __future__ import annotations

from pathlib import Path

import torch

from experiments.other_tasks import main, write_other_report
from experiments.runner import RunRecord
from experiments.tasks import digits_cnn_label_noise, digits_label_noise, mixture_label_noise


def test_quick_other_tasks_write_a_report_that_the_records_rebuild(tmp_path: Path) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "OTHER_TASKS.md").read_text()
    assert "digits CNN noise=40% seed=0" in report
    assert "mixture noise=40% seed=0" in report
    assert "## The same targets for the baselines" in report
    assert len(list((tmp_path / "figures").glob("*.png"))) == 2
    records = tmp_path / "out" / "other_tasks.pkl"
    (tmp_path / "OTHER_TASKS.md").unlink()
    assert main(["--from-records", str(records), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "OTHER_TASKS.md").read_text() == report


def _run(name: str, kind: str, noise: float, minimum: int, onset: int | None) -> RunRecord:
    rec = RunRecord(name, kind, noise=noise)
    rec.steps = list(range(0, 3001, 10))
    # A held-out loss with its minimum at ``minimum`` that then rises by half.
    rec.test_loss = [1.0 + 0.5 * abs(s - minimum) / 3000 for s in rec.steps]
    rec.train_loss = [1.0 / (1 + s) for s in rec.steps]
    rec.eb = [-1.0] * len(rec.steps)
    rec.mean_gsnr = [1.0] * len(rec.steps)
    if onset is not None:
        rec.events = [{"kind": "memorization_onset", "step": onset, "data": {}}]
    return rec


def test_the_report_judges_noisy_runs_by_timing_and_clean_runs_by_silence(tmp_path: Path) -> None:
    records = [
        _run("cnn hit", "digits-cnn", 0.2, 800, 700),  # within ×1.5 of 800
        _run("cnn late", "digits-cnn", 0.4, 800, 1300),  # 1,300 > 1,200: a miss
        _run("cnn clean", "digits-cnn", 0.0, 900, None),
        _run("mix hit", "mixture", 0.2, 600, 500),
        _run("mix clean alarm", "mixture", 0.0, 900, 400),  # a false alarm
    ]
    text = write_other_report(records, tmp_path, "test", 60.0)
    assert "| [cnn hit](figures/cnn_hit.png) | 800 | yes | 700 | 0.88 | — | yes |" in text
    assert "| [cnn late](figures/cnn_late.png) | 800 | yes | 1300 | 1.62 | — | no |" in text
    assert "onset within ×1.5 of its step: 1/2 (50 %), **not met**" in text
    assert "clean-label runs with no alarm: 0/1 (0 %), **not met**" in text
    assert "Both tasks: onset within ×1.5 in 2/3 (67 %), **not met**" in text
    assert "| agent's alarm (tail score) | 1/2 (50 %) | 1/1 (100 %) | 1/2 (50 %) |" in text
    assert "Misses (1): 0 fired before the held-out minimum (onset ÷ minimum —), 1 after" in text


def test_the_cnn_task_is_the_digits_task_as_images() -> None:
    mlp, cnn = digits_label_noise(0.2, 3), digits_cnn_label_noise(0.2, 3)
    assert cnn.train_x is not None and mlp.train_x is not None
    assert cnn.train_x.shape == (1000, 1, 8, 8)
    assert torch.equal(cnn.train_x.reshape(1000, 64), mlp.train_x)
    assert torch.equal(cnn.train_y, mlp.train_y) and torch.equal(cnn.test_y, mlp.test_y)
    assert cnn.model(cnn.train_x[:3]).shape == (3, 10)


def test_the_mixture_task_flips_training_labels_only() -> None:
    clean, noisy = mixture_label_noise(0.0, 1), mixture_label_noise(0.4, 1)
    assert clean.train_y is not None and noisy.train_y is not None and noisy.noisy is not None
    assert torch.equal(clean.test_y, noisy.test_y) and len(noisy.test_y) == 2000
    changed = clean.train_y != noisy.train_y
    assert torch.equal(changed, noisy.noisy)  # every flipped label names another class
    assert 0.35 < changed.float().mean().item() < 0.45
    assert set(clean.train_y.tolist()) == set(range(10))
