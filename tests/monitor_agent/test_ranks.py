"""DDP with two CPU processes (gloo): rank statistics equal one process on the
concatenated batch."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import monitor_agent as cs
from server.embedded_redis import free_port


def _model() -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def _worker(rank: int, world: int, port: int, x: torch.Tensor, y: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        run = cs.init("t", "ddp", mode="disabled")
        mon = run.watch(
            model, opt, batch_size=x.shape[0], noise="auto", sample_fraction=1.0,
            emit_every=1, keep_snapshot=True, dataset_size=1000,
        )  # fmt: skip
        half = x.shape[0] // world
        part = slice(rank * half, (rank + 1) * half)
        nn.functional.cross_entropy(model(x[part]), y[part]).backward()
        opt.step()
        snap = {"g": mon.snapshot["g"], "s": mon.snapshot["s"], "est": mon._last_estimator}
        torch.save(snap, f"{out}/rank{rank}.pt")
        run.finish()
        # Neither rank tears gloo down while the other may still use it (a rank that did
        # so aborted once under load: "terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_rank_statistics_equal_one_process_on_the_concatenated_batch() -> None:
    torch.manual_seed(random.randrange(10**9))
    x = torch.randn(16, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(2, free_port(), x, y, out), nprocs=2, join=True)
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(2)]

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    run = cs.init("t", "single", mode="disabled")
    mon = run.watch(
        model, opt, batch_size=16, noise="microbatch", sample_fraction=1.0,
        emit_every=1, keep_snapshot=True, dataset_size=1000,
    )  # fmt: skip
    for part in (slice(0, 8), slice(8, 16)):
        (nn.functional.cross_entropy(model(x[part]), y[part]) / 2).backward()
    opt.step()
    run.finish()
    for r in ranks:
        assert r["est"] == 1
        torch.testing.assert_close(r["g"], mon.snapshot["g"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(r["s"], mon.snapshot["s"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ranks[0]["s"], ranks[1]["s"], rtol=0, atol=0)


def test_only_rank_zero_publishes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    assert cs.init("t", "r1", redis_url="redis://127.0.0.1:1/0").mode == "disabled"
    run = cs.init("t", "r1", redis_url="redis://127.0.0.1:1/0", all_ranks=True)
    assert run.mode == "online"
    run.finish(timeout=1)
