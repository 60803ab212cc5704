"""The experiment tasks: digits with label noise, a fresh-data control, and grokking.

Data ship inside packages (scikit-learn's digits) or are generated; nothing downloads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from sklearn.datasets import load_digits
from torch import nn

from monitor_agent.demo import TinyTransformer, modular_addition


@dataclass
class Task:
    """A training set (possibly infinite), a held-out set, a model and its optimizer."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    train_x: torch.Tensor | None
    train_y: torch.Tensor | None
    test_x: torch.Tensor
    test_y: torch.Tensor
    batch_size: int
    dataset_size: int | None
    noisy: torch.Tensor | None = None


def mlp(d_in: int, n_out: int, width: int = 256) -> nn.Module:
    """The experiments' MLP."""
    return nn.Sequential(
        nn.Linear(d_in, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, n_out),
    )


# Adam's step on the label-noise runs; the time-scale runs change it.
DIGITS_LR = 3e-4


def digits_label_noise(
    noise: float, seed: int, n_train: int = 1000, batch_size: int = 64, lr: float = DIGITS_LR
) -> Task:
    """scikit-learn digits, standardized; a fraction ``noise`` of training labels replaced
    by a different class drawn uniformly; held-out labels are clean. ``lr`` sets Adam's
    step and with it the run's time scale."""
    gen = torch.Generator().manual_seed(seed)
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=gen)
    x, y = x[perm], y[perm]
    # Standardize with the training set's statistics, flooring each pixel's spread at
    # one grey level (of 16): several border pixels are constant in the training set,
    # and dividing by their ~0 spread blew held-out inputs up by ~10⁶ (the held-out loss
    # then started near 10 and its "minimum" was an artifact of those pixels).
    x = (x - x[:n_train].mean(0)) / x[:n_train].std(0).clamp_min(1.0)
    tx, ty, vx, vy = x[:n_train], y[:n_train].clone(), x[n_train:], y[n_train:]
    flip = torch.rand(n_train, generator=gen) < noise
    shift = torch.randint(1, 10, (n_train,), generator=gen)
    ty[flip] = (ty[flip] + shift[flip]) % 10
    torch.manual_seed(seed)
    model = mlp(64, 10)
    # A small learning rate stretches the dynamics: the held-out minimum falls well
    # after the agent's warm-up.
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def batch(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, n_train, (batch_size,), generator=gen)
        return tx[idx], ty[idx]

    name = f"digits noise={noise:.0%} seed={seed}" + (f" lr={lr:g}" if lr != DIGITS_LR else "")
    return Task(name, model, opt, batch, tx, ty, vx, vy,
                batch_size, n_train, flip)  # fmt: skip


def digits_full_batch(seed: int, n_train: int = 1000, noise: float = 0.0) -> Task:
    """The digits task trained on its whole training set every step (clean labels unless
    ``noise`` is given): with an exact estimator the agent's default memorization score is
    then the signal score."""
    task = digits_label_noise(noise, seed, n_train=n_train, batch_size=n_train)
    assert task.train_x is not None and task.train_y is not None
    whole = (task.train_x, task.train_y)
    label = f" noise={noise:.0%}" if noise else ""
    return replace(
        task,
        name=f"digits full batch{label} seed={seed}",
        batch=lambda _step: whole,
        noisy=task.noisy if noise else None,
    )


def fresh_data(seed: int, batch_size: int = 64) -> Task:
    """A teacher network labels fresh Gaussian inputs: a new batch every step."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(1000 + seed)
    teacher = mlp(64, 10, width=64)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 64, generator=gen)
        with torch.no_grad():
            y = teacher(x).argmax(1)
        return x, y

    vx, vy = draw(1000)
    torch.manual_seed(seed)
    model = mlp(64, 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    px, py = draw(256)
    return Task(f"fresh data seed={seed}", model, opt, lambda _s: draw(batch_size), px, py, vx, vy,
                batch_size, None)  # fmt: skip


def grokking(seed: int, p: int = 53, fraction: float = 0.3) -> Task:
    """Modular addition mod p, a one-block transformer, AdamW with weight decay 1, a
    fraction of all pairs for training, full batch."""
    task = modular_addition(p, train_fraction=fraction, seed=seed)
    torch.manual_seed(seed)
    model = TinyTransformer(p + 1, p)
    # lr 3e-3 (with weight decay 1): at 1e-3 this task had not generalized by step 8,000;
    # at 3e-3 held-out accuracy passes 90 % near step 4,000 on 2 CPU threads' budget.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1.0, betas=(0.9, 0.98))
    n = len(task.train_y)
    return Task(f"grokking p={p} seed={seed}", model, opt, lambda _s: (task.train_x, task.train_y),
                task.train_x, task.train_y, task.test_x, task.test_y, n, n)  # fmt: skip
