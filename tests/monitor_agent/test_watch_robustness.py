"""watch() on the awkward cases: sampling, budgets, low precision, sparse and frozen."""

from __future__ import annotations

import math
import random

import pytest
import redis
import torch
from torch import nn

import monitor_agent as cs
from monitor_agent import cpu_kernels, wire
from monitor_agent.watch import Monitor


def _scalars(client: redis.Redis, run: cs.Run) -> list[dict[str, float]]:
    return [
        wire.decode("scalars", f)["s"] for _, f in client.xrange(run.keys.stream(run.id, "scalars"))
    ]


def _tanh_mlp(
    width: int, n: int
) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    """A width-wide tanh MLP with 4 classes, its SGD optimizer and n random examples."""
    model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return model, opt, torch.randn(n, width), torch.randint(0, 4, (n,))


def _train(
    model: nn.Module, opt: torch.optim.Optimizer, steps: int, x: torch.Tensor, y: torch.Tensor
) -> None:
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (32,))
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()


def test_coordinate_sample_is_fixed_spread_and_reports_its_stderr(
    redis_url: str, redis_client: redis.Redis
) -> None:
    torch.manual_seed(random.randrange(10**9))
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 4))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.randn(512, 300), torch.randint(0, 4, (512,))
    with cs.init("t", "sample", redis_url=redis_url) as run:
        mon = run.watch(
            model, opt, batch_size=32, dataset_size=512, noise="per_example",
            sample_fraction=0.01, min_coords=1000, emit_every=5, budget=None,
        )  # fmt: skip
        assert isinstance(mon, Monitor)
        sl = mon.idx[0]
        assert sl is not None
        cols = {i % 300 for i in range(60_000)[sl]}
        assert len(cols) == 300  # every input column is visited
        assert mon.bounds[0][1] - mon.bounds[0][0] >= 1000
        assert mon.idx[1] is None  # a small tensor is covered fully
        _train(model, opt, 20, x, y)
    last = _scalars(redis_client, run)[-1]
    occ = last["signal/occupancy"]
    assert last["signal/occupancy_stderr"] == pytest.approx(
        math.sqrt(occ * (1 - occ) / mon.n_coords)
    )


def test_a_sampled_model_keeps_its_state_within_one_parameter_buffer(redis_url: str) -> None:
    # Many tensors just above min_coords (like a small CNN's): the per-tensor floor alone
    # would sample most coordinates, and a sample carries its own first moment.
    torch.manual_seed(random.randrange(10**9))
    model = nn.Sequential(*[nn.Linear(61, 61, bias=False) for _ in range(6)])
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.randn(64, 61), torch.randn(64, 61)
    params = sum(p.numel() for p in model.parameters())
    with cs.init("t", "state-cap", redis_url=redis_url) as run:
        mon = run.watch(model, opt, batch_size=16, min_coords=1500, emit_every=2, budget=None)
        assert isinstance(mon, Monitor)
        assert not mon.full_coverage
        for _ in range(4):
            idx = torch.randint(0, 64, (16,))
            nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad()
        assert mon.state_bytes() <= 4 * params
        assert all(hi - lo >= 1 for lo, hi in mon.bounds)
    # Asking for every coordinate is honoured: Adam's exp_avg is the first moment then.
    with cs.init("t", "state-full", redis_url=redis_url) as run:
        mon = run.watch(model, opt, batch_size=16, sample_fraction=1.0, budget=None)
        assert isinstance(mon, Monitor)
        assert mon.full_coverage and mon.n_coords == params


def test_every_step_reuses_the_workspace_tensors(redis_url: str) -> None:
    # Fresh per-step tensors page-faulted (the emitted step's rows on every 4 KiB page) or
    # unsettled the heap the training step allocates from; the monitor's workspace hands
    # the same tensors to every step.
    torch.manual_seed(random.randrange(10**9))
    model, opt, x, y = _tanh_mlp(300, 256)
    params = sum(p.numel() for p in model.parameters())
    with cs.init("t", "scratch", redis_url=redis_url) as run:
        mon = run.watch(
            model, opt, batch_size=32, dataset_size=256, emit_every=1, budget=None,
            min_coords=1000,
        )  # fmt: skip
        assert isinstance(mon, Monitor)
        _train(model, opt, 2, x, y)
        kept = {name: t.data_ptr() for name, t in mon.workspace.kept().items()}
        # the gathered gradient, m̂, the update's difference, ŝ, m̂² and the statistics rows
        assert {"g", "m_hat", "d", "s_stream", "m2", "statistics", "closed"} <= set(kept)
        size = mon.workspace.nbytes()
        _train(model, opt, 3, x, y)
        assert {name: t.data_ptr() for name, t in mon.workspace.kept().items()} == kept
        assert mon.workspace.nbytes() == size <= 4 * params
    # A model whose every coordinate is tracked keeps at most one parameter-sized buffer
    # of scratch; the rest is made per use.
    small, opt, x, y = _tanh_mlp(20, 64)
    with cs.init("t", "scratch-small", redis_url=redis_url) as run:
        mon = run.watch(small, opt, batch_size=32, dataset_size=64, emit_every=1, budget=None)
        assert isinstance(mon, Monitor)
        _train(small, opt, 3, x, y)
        assert 0 < mon.workspace.nbytes() <= 4 * sum(p.numel() for p in small.parameters())
        assert "statistics" not in mon.workspace.kept()


def test_cpu_kernels_publish_what_the_torch_path_publishes(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """watch(cpu_kernels=True) on two identical runs: the same published statistics and
    histograms (to float32 rounding, which the running moments carry from step to step),
    and the fused kernels' plan in use."""
    assert cpu_kernels.load(wait=True), cpu_kernels.state()
    seed = random.randrange(10**9)
    layers, hists = [], []
    for fused in (False, True):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 4))
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        x, y = torch.randn(512, 300), torch.randint(0, 4, (512,))
        with cs.init("t", f"fused-{fused}", redis_url=redis_url) as run:
            mon = run.watch(
                model, opt, batch_size=32, dataset_size=512, emit_every=2, budget=None,
                min_coords=2000, cpu_kernels=fused,
            )  # fmt: skip
            assert isinstance(mon, Monitor)
            _train(model, opt, 240, x, y)
            assert ("statistics" in mon.workspace.kept()) == (not fused)
            assert (mon._plan is not None) == fused
            assert not mon.workspace._objects  # its torch-path steps ran the same plan
            run_id, keys = run.id, run.keys
        stream = keys.stream(run_id, "layers")
        layers.append([wire.decode("layers", f)["l"] for _, f in redis_client.xrange(stream)])
        stream = keys.stream(run_id, "hist")
        hists.append([wire.decode("hist", f)["counts"] for _, f in redis_client.xrange(stream)])
    assert len(layers[0]) == len(layers[1]) > 50
    assert len(hists[0]) == len(hists[1]) >= 5  # every 20 steps once warm
    # Counts move between neighbouring bins only where rounding puts a value on an edge.
    for a, b in zip(*hists, strict=True):
        for row_a, row_b in zip(a, b, strict=True):
            assert sum(row_a) == sum(row_b)
            assert sum(abs(x - y) for x, y in zip(row_a, row_b, strict=True)) <= max(
                2, sum(row_a) // 500
            )
    # A coordinate within rounding of its gate can count on one side in one run and on
    # the other in the other: the counted fields may differ by a coordinate, rarely.
    counted = ("occupancy", "population_fraction", "persistent_reservoir")
    entries = flips = 0
    for a, b in zip(*layers, strict=True):
        assert a.keys() == b.keys()
        for field in a:
            if field in counted:
                entries += len(a[field])
                pairs = zip(a[field], b[field], strict=True)
                flips += sum(x != pytest.approx(y, abs=1e-6) for x, y in pairs)
            else:
                assert a[field] == pytest.approx(b[field], rel=1e-4, abs=1e-6), field
    assert flips <= entries // 100


def test_budget_thins_the_schedule_and_overhead_is_reported(
    redis_url: str, redis_client: redis.Redis
) -> None:
    model, opt, x, y = _tanh_mlp(50, 256)
    with cs.init("t", "budget", redis_url=redis_url) as run:
        # an impossible budget: the agent must thin to its sparsest schedule
        mon = run.watch(model, opt, batch_size=32, dataset_size=256, emit_every=8, budget=1e-9)
        _train(model, opt, 400, x, y)
        # streaming update thinned to one per emission, emissions spaced out 8×
        assert mon.emit_interval == 64
        assert mon.stride == 64
    rows = _scalars(redis_client, run)
    assert "agent/overhead" not in rows[0]
    # training-thread time plus the sender thread's CPU: above 1 on a model this tiny
    assert all(0 <= r["agent/overhead"] < 100 for r in rows[1:])
    assert rows[-1]["agent/stride"] == 64
    assert rows[-1]["agent/emit_every"] == 64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_give_finite_statistics(
    dtype: torch.dtype, redis_url: str, redis_client: redis.Redis
) -> None:
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 3)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(128, 20, dtype=dtype), torch.randint(0, 3, (128,))
    with cs.init("t", "lowp", redis_url=redis_url) as run:
        run.watch(model, opt, batch_size=32, dataset_size=128, noise="per_example", emit_every=5)
        _train(model, opt, 10, x, y)
    last = _scalars(redis_client, run)[-1]
    assert math.isfinite(last["signal/occupancy"])
    assert last["signal/estimator"] == 2.0


def test_grad_scaler_statistics_use_unscaled_gradients() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    snaps = []
    for scale in (1.0, 2.0**12):
        torch.manual_seed(1)
        model = nn.Linear(8, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        run = cs.init("t", "scaler", mode="disabled")
        mon = run.watch(
            model, opt, batch_size=64, dataset_size=640, noise="per_example",
            sample_fraction=1.0, emit_every=1, keep_snapshot=True, grad_scaler=scaler,
        )  # fmt: skip
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        snaps.append(mon.snapshot)
        run.finish()
    torch.testing.assert_close(snaps[0]["g"], snaps[1]["g"])
    torch.testing.assert_close(snaps[0]["s"], snaps[1]["s"], rtol=1e-4, atol=1e-10)


def test_sparse_embedding_frozen_layers_and_missing_gradients() -> None:
    emb = nn.Embedding(100, 8, sparse=True)
    frozen = nn.Linear(8, 8)
    frozen.requires_grad_(False)
    unused = nn.Linear(8, 8)
    head = nn.Linear(8, 3)
    model = nn.ModuleDict({"emb": emb, "frozen": frozen, "unused": unused, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = cs.init("t", "sparse", mode="disabled")
    mon = run.watch(model, opt, batch_size=16, dataset_size=160, emit_every=1, keep_snapshot=True)
    assert isinstance(mon, Monitor)
    assert not any(n.startswith("frozen") for n in mon.names)
    for _ in range(3):
        tokens = torch.randint(0, 100, (16,))
        out = head(frozen(emb(tokens)))
        nn.functional.cross_entropy(out, torch.randint(0, 3, (16,))).backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(mon.snapshot["g"]).all()
    lo, hi = mon.bounds[mon.names.index("unused.weight")]
    assert mon.snapshot["g"][lo:hi].abs().sum() == 0
    run.finish()


def test_budget_cuts_work_by_the_measured_excess_in_one_emission() -> None:
    model, opt, _x, _y = _tanh_mlp(20, 1)
    run = cs.init("t", "adapt", mode="disabled")
    mon = run.watch(model, opt, batch_size=32, dataset_size=256, emit_every=10, budget=0.03)
    mon._adapt(0.11)  # 0.11 / (0.75 · 0.03) ≈ 4.9 → 8× less streaming work at once
    assert (mon.stride, mon.emit_interval) == (8, 10)
    mon._adapt(0.5)  # stride is capped by the emission interval; the rest spaces emissions
    assert (mon.stride, mon.emit_interval) == (80, 80)
    mon._adapt(0.001)  # well under budget: one halving back at a time
    assert (mon.stride, mon.emit_interval) == (40, 40)
    run.finish()


def test_per_example_hooks_exist_only_on_captured_steps() -> None:
    model, opt, x, y = _tanh_mlp(20, 64)
    run = cs.init("t", "hooks", mode="disabled")
    mon = run.watch(
        model, opt, batch_size=32, dataset_size=64, noise="per_example",
        per_example_every=5, emit_every=5, budget=None,
    )  # fmt: skip
    hooked = []
    for _ in range(12):
        hooked.append(bool(model[0]._forward_hooks))
        _train(model, opt, 1, x, y)
    # captured before steps 0, 5 and 10 (the emitted ones) and nowhere else
    assert [i for i, h in enumerate(hooked) if h] == [0, 5, 10]
    assert mon.stride == 5  # the streaming fallback runs on emitted steps only
    run.finish()


def test_slower_schedules_run_on_the_first_emission_of_each_interval(
    redis_url: str, redis_client: redis.Redis
) -> None:
    model, opt, x, y = _tanh_mlp(20, 64)
    with cs.init("t", "schedules", redis_url=redis_url) as run:
        # emissions every 30 steps never fall on a multiple of 100 but at 0 and 300
        run.watch(
            model, opt, batch_size=32, dataset_size=64, emit_every=30, hist_every=100,
            budget=None, probe=(x[:16], y[:16]), memorization={"probe_every": 50},
        )  # fmt: skip
        _train(model, opt, 250, x, y)
    hist = [
        wire.decode("hist", f)["step"]
        for _, f in redis_client.xrange(run.keys.stream(run.id, "hist"))
    ]
    tail = [
        r["step"]
        for _, f in redis_client.xrange(run.keys.stream(run.id, "scalars"))
        if "memorization/disagree_fraction" in (r := wire.decode("scalars", f))["s"]
    ]
    assert hist == [120, 240]  # step 0 is computed but not published: not warm yet
    # the probe runs at 0, 60, 120, …; scores are published once the estimate is warm
    assert tail == [120, 180, 240]
