"""The fused CPU kernels' plans (monitor_agent.cpu_statistics.Plan: the gather, the per-step
update, the one-call emitted step) against the torch ops they replace, and their loader;
the statistics' twin tests are in test_signal_stats."""

from __future__ import annotations

import itertools
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from monitor_agent import cpu_kernels
from monitor_agent.microbatch import sampled_flat


@pytest.fixture(scope="module")
def kernels() -> object:
    assert cpu_kernels.load(wait=True), cpu_kernels.state()
    return cpu_kernels.loaded()


def _layers(
    gen: torch.Generator,
    dtype: torch.dtype,
    shapes: list[tuple[int, ...]],
    samples: list[slice | None],
) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Random tensors of these shapes and the bounds of their samples in one flat vector."""
    tensors = [torch.randn(shape, generator=gen, dtype=dtype) for shape in shapes]
    sizes = [
        len(range(t.numel())[sl]) if sl else t.numel()
        for t, sl in zip(tensors, samples, strict=True)
    ]
    return tensors, list(itertools.pairwise([0, *itertools.accumulate(sizes)]))


def _plan(n: int, bounds: list[tuple[int, int]], samples: list[slice | None], b: int,
          gate: object, dtype: torch.dtype) -> object:  # fmt: skip
    from monitor_agent import signal_stats as st

    plan = st.fused_plan(n, bounds, b, gate, dtype, samples)  # type: ignore[arg-type]
    assert plan is not None
    return plan


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_writes_the_sampled_coordinates_and_their_sum(
    kernels: object, dtype: torch.dtype
) -> None:
    from monitor_agent import signal_stats as st

    gen = torch.Generator().manual_seed(random.randrange(10**9))
    shapes = [(300, 200), (200,), (7, 3, 3, 5), (1,)]
    samples = [slice(3, 60_000, 41), None, slice(0, 315, 2), None]
    tensors, bounds = _layers(gen, dtype, shapes, samples)
    plan = _plan(bounds[-1][1], bounds, samples, 16, st.GateSettings(), dtype)
    out = torch.empty(bounds[-1][1], dtype=dtype)
    total = plan.gather(tensors, out)  # type: ignore[attr-defined]
    want = torch.cat([sampled_flat(t, s, dtype) for t, s in zip(tensors, samples, strict=True)])
    assert torch.equal(out, want)
    assert total == pytest.approx(float(want.double().sum()), rel=1e-9, abs=1e-9)
    tensors[2][0, 0, 0, 0] = float("inf")
    assert plan.gather(tensors, out) == float("inf")  # type: ignore[attr-defined]
    # What the kernels cannot take is left to the torch path, out untouched.
    out.fill_(7)
    for bad in (None, tensors[0].t(), tensors[0].half(), tensors[0].to_sparse()):
        assert plan.gather([bad, *tensors[1:]], out) is None  # type: ignore[attr-defined]
        assert bool((out == 7).all())
    with pytest.raises(ValueError, match="coordinates"):
        plan.gather(tensors, out[:-1])  # type: ignore[attr-defined]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("own_m", [True, False])
def test_update_moments_match_the_torch_lerps(
    kernels: object, dtype: torch.dtype, own_m: bool
) -> None:
    from monitor_agent import signal_stats as st

    gen = torch.Generator().manual_seed(random.randrange(10**9))
    n = 5003
    plan = _plan(n, [(0, 3000), (3000, n)], [None, None], 16, st.GateSettings(), dtype)
    s, m = torch.rand(n, generator=gen, dtype=dtype), torch.randn(n, generator=gen, dtype=dtype)
    s_twin, m_twin = s.clone(), m.clone()
    prev = torch.randn(n, generator=gen, dtype=dtype)  # Adam's exp_avg when not own_m
    for _ in range(20):
        g = torch.randn(n, generator=gen, dtype=dtype)
        m_prev, m_prev_twin = (m, m_twin) if own_m else (prev, prev)
        assert plan.update_moments(g, m_prev, s, own_m, 0.01, 0.1)  # type: ignore[attr-defined]
        d = g - m_prev_twin
        s_twin.lerp_(d * d, 0.01)
        if own_m:
            m_twin.lerp_(g, 0.1)
    # torch's lerp rounds once through a fused multiply-add; the kernels round twice
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-12, 1e-14)
    torch.testing.assert_close(s, s_twin, rtol=rtol, atol=atol)
    torch.testing.assert_close(m, m_twin, rtol=rtol, atol=atol)
    if not own_m:
        assert torch.equal(m, m_twin)  # untouched
    strided = torch.rand(2 * n, dtype=dtype)[::2]
    assert not plan.update_moments(strided, m, s, own_m, 0.01, 0.1)  # type: ignore[attr-defined]


def test_the_loader_can_be_turned_off_and_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from monitor_agent import cpu_kernels\n"
        "assert 'numba' not in sys.modules and 'torch' not in sys.modules\n"
        "assert not cpu_kernels.load(wait=True)\n"
        "print(cpu_kernels.state())\n"
        "assert 'numba' not in sys.modules\n"
    )
    env = {**os.environ, "CHANNELSCOPE_CPU_KERNELS": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "turned off by CHANNELSCOPE_CPU_KERNELS=0"


def test_without_numba_the_loader_warns_and_watch_keeps_the_torch_path() -> None:
    # sys.modules["numba"] = None makes `import numba` fail as it does where numba is not
    # installed (failure injection; the rest is real).
    code = (
        "import sys, warnings\n"
        "sys.modules['numba'] = None\n"
        "import torch\n"
        "from torch import nn\n"
        "import monitor_agent as cs\n"
        "from monitor_agent import cpu_kernels\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    assert not cpu_kernels.load(wait=True)\n"
        "assert any('fused CPU kernels unavailable' in str(w.message) for w in caught)\n"
        "print(cpu_kernels.state().split(':')[0])\n"
        "model = nn.Linear(20, 3)\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "run = cs.init('t', 'no-numba', mode='disabled')\n"
        "mon = run.watch(model, opt, batch_size=8, dataset_size=64, emit_every=1,\n"
        "                budget=None, cpu_kernels=True)\n"
        "for _ in range(3):\n"
        "    x, y = torch.randn(8, 20), torch.randint(0, 3, (8,))\n"
        "    nn.functional.cross_entropy(model(x), y).backward()\n"
        "    opt.step()\n"
        "    opt.zero_grad()\n"
        "assert mon.step == 3 and 'sums' not in mon.workspace.kept()  # the torch path\n"
        "run.finish()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ModuleNotFoundError"


SHAPES = [(100, 30), (1,), (7, 100), (1500,)]
SAMPLES = [slice(5, 3000, 1), None, slice(3, 700, 3), slice(0, 1500, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("own_m", "update"), [(True, True), (False, True), (False, False)])
def test_the_streaming_pass_matches_the_update_then_the_statistics_in_torch(
    kernels: object, dtype: torch.dtype, own_m: bool, update: bool
) -> None:
    """The monitor's one-pass emitted step (a plan run with the streaming weights, gathering
    the gradients' samples; on one step also measuring w from Adam's exp_avg_sq and
    counting the histograms) against its torch twin: the gather, the moments' update (none
    when ``update`` is false), m̂ and ŝ, w, then signal_stats.layer_statistics and
    log_snr_histograms on the torch path; over a few steps in a row."""
    from monitor_agent import signal_stats as st

    gen = torch.Generator().manual_seed(random.randrange(10**9))
    sources, bounds = _layers(gen, dtype, SHAPES, SAMPLES)
    n = bounds[-1][1]
    gate = st.GateSettings(alpha=1.0, soft_lambda=1.0, alpha_n=0.02, reservoir_evals=2)
    rho, beta, b = 0.99, 0.9, 64
    plan = _plan(n, bounds, SAMPLES, b, gate, dtype)
    s = torch.rand(n, generator=gen, dtype=dtype) * 0.1
    m = torch.randn(n, generator=gen, dtype=dtype) * 0.1
    w = torch.rand(n, generator=gen, dtype=dtype)
    g = torch.full((n,), 7.0, dtype=dtype)
    s_twin, m_twin, w_twin = s.clone(), m.clone(), w.clone()
    closed, closed_twin = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    v = [torch.rand(t.shape, generator=gen, dtype=dtype) * 1e-3 for t in sources]
    constants = [(1e-3 * (k + 1), 1 - 0.999 ** (k + 3), 1e-8) for k in range(len(v))]
    for step in range(1, 4):
        for t in sources:
            t.normal_(0.05, 0.3, generator=gen)
        g_twin = torch.cat(
            [sampled_flat(t, sl, dtype) for t, sl in zip(sources, SAMPLES, strict=True)]
        )
        c_m = 1 / (1 - beta ** (step + 1))
        c_s = (1 + beta) / 2 / (1 - rho**step)
        # Rounding decides a gate only within ~1e-7 of its threshold: keep every coordinate
        # away from both thresholds, so both sides count the same coordinates.
        for _ in range(20):
            m2 = ((m_twin + (1 - beta) * (g_twin - m_twin)) * c_m).double() ** 2
            s_next = s_twin.double() + (1 - rho) * update * (
                (g_twin - m_twin).double() ** 2 - s_twin
            )
            near = ((m2 / (s_next * c_s) - 1).abs() < 1e-4) | (
                (m2 / (gate.alpha_n * s_next * c_s) - 1).abs() < 1e-4
            )
            if not bool(near.any()):
                break
            g_twin[near] += 0.01
            for t, sl, (lo, hi) in zip(sources, SAMPLES, bounds, strict=True):
                t.view(-1)[sl or slice(None)] = g_twin[lo:hi]
        extras = step == 2
        weights = ((1 - rho) * update, 1 - beta, 1 - beta, c_m, c_s)
        total = plan.run(  # type: ignore[attr-defined]
            (g, m, s, w, m), closed, stream=weights, own_m=own_m and update, sources=sources,
            step_scale=(v, constants) if extras else None, hist=extras,
        )  # fmt: skip
        assert torch.equal(g, g_twin)
        assert total == pytest.approx(float(g_twin.double().sum()), rel=1e-9, abs=1e-9)
        if extras:
            w_twin = torch.cat([
                lr / ((sampled_flat(t, sl, dtype) / c).sqrt() + eps)
                for t, sl, (lr, c, eps) in zip(v, SAMPLES, constants, strict=True)
            ])  # fmt: skip
            torch.testing.assert_close(
                w, w_twin, rtol=1e-6 if dtype == torch.float32 else 1e-15, atol=0
            )
        m_hat = torch.lerp(m_twin, g_twin, 1 - beta) * c_m
        if update:
            d = g_twin - m_twin
            s_twin.lerp_(d * d, 1 - rho)
            if own_m:
                m_twin.lerp_(g_twin, 1 - beta)
        per_layer, overall, rates = st.layer_statistics(
            g_twin, s_twin * c_s, m_hat * m_hat, w_twin, m_hat * m_hat, closed_twin, bounds, b,
            gate, fused=False,
        )  # fmt: skip
        want = torch.cat([overall, per_layer.reshape(-1), rates]).double()
        assert torch.equal(closed, closed_twin)
        rtol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(torch.from_numpy(plan.out), want, rtol=rtol, atol=1e-9)  # type: ignore[attr-defined]
        if extras:
            hist_twin = st.log_snr_histograms(g_twin, s_twin * c_s, bounds).double()
            hist = torch.from_numpy(plan.hist)  # type: ignore[attr-defined]
            assert torch.equal(hist.sum(dim=1), hist_twin.sum(dim=1))
            # log10 may round differently by an ulp: only values at a bin edge may move.
            x = torch.log10((g_twin.double() ** 2 + 1e-30) / (s_twin.double() * c_s + 1e-30))
            at_edge = int(((x * 2 - (x * 2).round()).abs() < 1e-5).sum())
            assert float((hist - hist_twin).abs().sum()) <= 2 * at_edge
    atol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(s, s_twin, rtol=1e-5, atol=atol)
    torch.testing.assert_close(m, m_twin, rtol=1e-5, atol=atol)


def test_a_non_finite_gradient_is_gathered_and_nothing_else_changes(kernels: object) -> None:
    from monitor_agent import signal_stats as st

    gen = torch.Generator().manual_seed(random.randrange(10**9))
    sources, bounds = _layers(gen, torch.float32, SHAPES, SAMPLES)
    n = bounds[-1][1]
    plan = _plan(n, bounds, SAMPLES, 16, st.GateSettings(), torch.float32)
    g, m, s, w = torch.zeros(n), torch.rand(n), torch.rand(n), torch.rand(n)
    closed = torch.full((n,), 3, dtype=torch.uint8)
    before = [t.clone() for t in (m, s, w, closed)]
    out_before = plan.out.copy()  # type: ignore[attr-defined]
    sources[2].view(-1)[3 + 3 * 5] = float("nan")
    total = plan.run(  # type: ignore[attr-defined]
        (g, m, s, w, m), closed, stream=(0.01, 0.1, 0.1, 1.0, 1.0), own_m=True,
        sources=sources, step_scale=([t.abs() for t in sources], [(1.0, 1.0, 1e-8)] * 4),
        hist=True,
    )  # fmt: skip
    assert math.isnan(total)
    assert torch.equal(g.isnan(), torch.arange(n) == bounds[2][0] + 5)
    for t, was in zip((m, s, w, closed), before, strict=True):
        assert torch.equal(t, was)
    assert (plan.out == out_before).all()  # type: ignore[attr-defined]


def test_plans_refuse_what_they_cannot_take(kernels: object) -> None:
    """The kernels index without bounds checks: a short vector or source, or bounds past
    the end, is a ValueError, not a read or write past the end; a tensor of another dtype,
    layout or device is None, with nothing changed, for the torch path to serve."""
    from monitor_agent import signal_stats as st

    gen = torch.Generator().manual_seed(random.randrange(10**9))
    sources, bounds = _layers(gen, torch.float32, SHAPES, SAMPLES)
    n = bounds[-1][1]
    gate = st.GateSettings()
    with pytest.raises(ValueError, match="bounds"):
        _plan(n - 1, bounds, SAMPLES, 16, gate, torch.float32)
    plan = _plan(n, bounds, SAMPLES, 16, gate, torch.float32)
    v = torch.rand(n)
    closed = torch.zeros(n, dtype=torch.uint8)
    assert plan.run((v, v, v, v, v), closed) == 0.0  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="coordinates"):
        plan.run((v, v[:-1], v, v, v), closed)  # type: ignore[attr-defined]
    short = [*sources[:3], sources[3][:-1]]
    with pytest.raises(ValueError, match="elements"):
        plan.run((v, v, v, v, v), closed, sources=short)  # type: ignore[attr-defined]
    kept = v.clone()
    for bad in (v.double(), torch.rand(2 * n)[::2]):
        assert plan.run((v, v, bad, v, v), closed) is None  # type: ignore[attr-defined]
    for bad_source in (None, sources[0].t(), sources[0].half(), sources[0].to_sparse()):
        assert plan.run((v, v, v, v, v), closed, sources=[bad_source, *sources[1:]]) is None  # type: ignore[attr-defined]
    assert torch.equal(v, kept)
