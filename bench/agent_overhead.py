"""Agent overhead: training step time with and without channelscope, interleaved.

Every configuration trains its own copy of the model; rounds cycle through the
configurations so machine noise hits all of them alike, and the report gives the median
over rounds of (step time with the agent) / (step time without). Run:

    .venv/bin/python bench/agent_overhead.py [--rounds 7] [--steps 30] [--device cpu]

Results go to bench/results/agent_overhead.md (or --out).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

import monitor_agent as cs
from server.embedded_redis import EmbeddedRedis


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

CONFIGS: dict[str, dict[str, Any] | None] = {
    "no monitoring": None,
    "channelscope default": {},
    "per-example every 50": {"noise": "per_example", "per_example_every": 50},
    "per-example every step": {"noise": "per_example", "per_example_every": 1},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_workload(
    w: Workload, rounds: int, steps: int, device: torch.device, redis_url: str
) -> dict[str, Any]:
    torch.manual_seed(0)
    base = w.make().to(device)
    x, y = w.batch(device)
    setups = {}
    for name, kwargs in CONFIGS.items():
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        run = None
        if kwargs is not None:
            run = cs.init("bench", f"{w.name} {name}", redis_url=redis_url)
            run.watch(model, opt, batch_size=w.batch_size, dataset_size=50_000, **kwargs)
        setups[name] = (model, opt, run)

    def train(name: str, n: int) -> float:
        model, opt, _ = setups[name]
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        return (time.perf_counter() - t0) / n

    for name in setups:  # warm-up: allocator, Adam state, first emission
        train(name, 10)
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(rounds):
        for name in setups:
            times[name].append(train(name, steps))
    ratios = {}
    for name in setups:
        per_round = [t / b for t, b in zip(times[name], times["no monitoring"], strict=True)]
        ratios[name] = statistics.median(per_round)
    n_params = sum(p.numel() for p in base.parameters())
    extra = {}
    for name, (_, _, run) in setups.items():
        if run is not None:
            mon = run._monitor
            # state the agent keeps per step: s and m (floats) and the reservoir counter
            extra[name] = (2 * mon.n_coords * mon.s.element_size() + mon.n_coords * 4) / (
                4 * n_params
            )
            run.finish()
    return {
        "step_ms": statistics.median(times["no monitoring"]) * 1e3,
        "ratios": ratios,
        "extra_buffers": extra,
        "params": n_params,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="substring of the workloads to run")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "agent_overhead.md")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    redis = EmbeddedRedis(Path(tempfile.mkdtemp()), appendonly=False).start()
    rows = []
    try:
        for w in WORKLOADS:
            if args.only and args.only not in w.name:
                continue
            steps = max(3, args.steps // 4) if "transformer" in w.name else args.steps
            res = bench_workload(w, args.rounds, steps, device, redis.url)
            rows.append((w, res))
            print(
                w.name,
                f"{res['step_ms']:.2f} ms/step",
                {k: round(v, 3) for k, v in res["ratios"].items()},
                flush=True,
            )
    finally:
        redis.stop()
    lines = [
        "# Agent overhead",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"Device: {args.device}, torch threads: {args.threads}, torch {torch.__version__}, "
        f"{args.rounds} interleaved rounds; Adam; agent writing to a real local Redis.",
        "",
        "Cells are the median over rounds of step time with the agent / step time without "
        "(1.000 = no overhead). 'state' is the agent's per-step state as a fraction of one "
        "parameter-sized float32 buffer.",
        "",
        "| workload | step (ms) | "
        + " | ".join(c for c in CONFIGS if c != "no monitoring")
        + " | state (default) |",
        "|---|---|" + "---|" * (len(CONFIGS) - 1) + "---|",
    ]
    for w, res in rows:
        cells = [f"{res['ratios'][c]:.3f}" for c in CONFIGS if c != "no monitoring"]
        lines.append(
            f"| {w.name} | {res['step_ms']:.2f} | "
            + " | ".join(cells)
            + f" | {res['extra_buffers']['channelscope default']:.3f} |"
        )
    lines += [
        "",
        "Peers (Cockpit, BackPACK, wandb.watch) are not measured here: see the issue note.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
