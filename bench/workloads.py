"""The benchmark models shared by the agent-overhead and spectrum-cost benchmarks."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Workload:
    name: str
    make: Callable[[], nn.Module]
    batch: Callable[[torch.device], tuple[torch.Tensor, torch.Tensor]]
    batch_size: int


def mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Transformer(nn.Module):
    def __init__(self, d: int = 256, heads: int = 4, layers: int = 4, vocab: int = 1000) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(self.embed(x)))
        return out.reshape(-1, out.shape[-1])


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.f(x))


def small_resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), Residual(32), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), Residual(64), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


WORKLOADS = [
    Workload(
        "MLP 784-512-512-10, b=128",
        lambda: mlp([784, 512, 512, 10]),
        lambda d: (torch.randn(128, 784, device=d), torch.randint(0, 10, (128,), device=d)),
        128,
    ),
    Workload(
        "MLP 784-1024-1024-10, b=256",
        lambda: mlp([784, 1024, 1024, 10]),
        lambda d: (torch.randn(256, 784, device=d), torch.randint(0, 10, (256,), device=d)),
        256,
    ),
    Workload(
        "small ResNet 32x32, b=64",
        small_resnet,
        lambda d: (torch.randn(64, 3, 32, 32, device=d), torch.randint(0, 10, (64,), device=d)),
        64,
    ),
    Workload(
        "transformer 4x256, seq 128, b=16",
        Transformer,
        lambda d: (
            torch.randint(0, 1000, (16, 128), device=d),
            torch.randint(0, 1000, (16 * 128,), device=d),
        ),
        16,
    ),
]
