"""The fused CPU kernels' per-step update (monitor_agent.cpu_statistics) against the torch
ops it replaces, and their loader; the statistics' twin tests are in test_signal_stats."""

from __future__ import annotations

import itertools
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_writes_the_sampled_coordinates_and_their_sum(
    kernels: object, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(random.randrange(10**9))
    shapes = [(300, 200), (200,), (7, 3, 3, 5), (1,)]
    tensors = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    samples = [slice(3, 60_000, 41), None, slice(0, 315, 2), None]
    pairs = list(zip(tensors, samples, strict=True))
    sizes = [len(range(t.numel())[s]) if s else t.numel() for t, s in pairs]
    bounds = list(itertools.pairwise([0, *itertools.accumulate(sizes)]))
    out = torch.empty(sum(sizes), dtype=dtype)
    total = kernels.gather(tensors, samples, bounds, out)  # type: ignore[attr-defined]
    want = torch.cat([sampled_flat(t, s, dtype) for t, s in pairs])
    assert torch.equal(out, want)
    assert total == pytest.approx(float(want.double().sum()), rel=1e-9, abs=1e-9)
    tensors[2][0, 0, 0, 0] = float("inf")
    assert kernels.gather(tensors, samples, bounds, out) == float("inf")  # type: ignore[attr-defined]
    # What the kernels cannot take is left to the torch path, out untouched.
    out.fill_(7)
    for bad in (None, tensors[0].t(), tensors[0].half(), tensors[0].to_sparse()):
        assert kernels.gather([bad, *tensors[1:]], samples, bounds, out) is None  # type: ignore[attr-defined]
        assert bool((out == 7).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("own_m", [True, False])
def test_update_moments_match_the_torch_lerps(
    kernels: object, dtype: torch.dtype, own_m: bool
) -> None:
    gen = torch.Generator().manual_seed(random.randrange(10**9))
    n = 5003
    s, m = torch.rand(n, generator=gen, dtype=dtype), torch.randn(n, generator=gen, dtype=dtype)
    s_twin, m_twin = s.clone(), m.clone()
    prev = torch.randn(n, generator=gen, dtype=dtype)  # Adam's exp_avg when not own_m
    for _ in range(20):
        g = torch.randn(n, generator=gen, dtype=dtype)
        m_prev, m_prev_twin = (m, m_twin) if own_m else (prev, prev)
        assert kernels.update_moments(g, m_prev, s, own_m, 0.01, 0.1)  # type: ignore[attr-defined]
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
    assert not kernels.update_moments(strided, m, s, own_m, 0.01, 0.1)  # type: ignore[attr-defined]


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("own_m", "update"), [(True, True), (False, True), (False, False)])
def test_the_streaming_pass_matches_the_update_then_the_statistics_in_torch(
    kernels: object, dtype: torch.dtype, own_m: bool, update: bool
) -> None:
    """signal_stats.fused_fields with the streaming weights (the monitor's one-pass
    emitted step) against its torch twin: the moments' update (none when ``update`` is
    false), m̂ and ŝ, then signal_stats.layer_statistics on the torch path; over a few
    steps in a row."""
    from monitor_agent import signal_stats as st

    gen = torch.Generator().manual_seed(random.randrange(10**9))
    sizes = [3000, 1, 700, 1500]
    bounds = list(itertools.pairwise([0, *itertools.accumulate(sizes)]))
    n = sum(sizes)
    gate = st.GateSettings(alpha=1.0, soft_lambda=1.0, alpha_n=0.02, reservoir_evals=2)
    rho, beta, b = 0.99, 0.9, 64
    s = torch.rand(n, generator=gen, dtype=dtype) * 0.1
    m = torch.randn(n, generator=gen, dtype=dtype) * 0.1
    w = torch.rand(n, generator=gen, dtype=dtype)
    s_twin, m_twin = s.clone(), m.clone()
    closed, closed_twin = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    workspace = st.Workspace(n, dtype, torch.device("cpu"))
    for step in range(1, 4):
        g = torch.randn(n, generator=gen, dtype=dtype) * 0.3 + 0.05
        c_m = 1 / (1 - beta ** (step + 1))
        c_s = (1 + beta) / 2 / (1 - rho**step)
        # Rounding decides a gate only within ~1e-7 of its threshold: keep every coordinate
        # away from both thresholds, so both sides count the same coordinates.
        for _ in range(20):
            m2 = ((m_twin + (1 - beta) * (g - m_twin)) * c_m).double() ** 2
            s_next = s_twin.double() + (1 - rho) * update * ((g - m_twin).double() ** 2 - s_twin)
            near = ((m2 / (s_next * c_s) - 1).abs() < 1e-4) | (
                (m2 / (gate.alpha_n * s_next * c_s) - 1).abs() < 1e-4
            )
            if not bool(near.any()):
                break
            g[near] += 0.01
        weights = ((1 - rho) * update, 1 - beta, 1 - beta, c_m, c_s)
        out = st.fused_fields(
            (g, m, s, w, m), closed, bounds, b, gate, workspace, stream=weights,
            own_m=own_m and update,
        )  # fmt: skip
        assert out is not None
        m_hat = torch.lerp(m_twin, g, 1 - beta) * c_m
        if update:
            d = g - m_twin
            s_twin.lerp_(d * d, 1 - rho)
            if own_m:
                m_twin.lerp_(g, 1 - beta)
        per_layer, overall, rates = st.layer_statistics(
            g, s_twin * c_s, m_hat * m_hat, w, m_hat * m_hat, closed_twin, bounds, b, gate,
            fused=False,
        )  # fmt: skip
        want = torch.cat([overall, per_layer.reshape(-1), rates]).double()
        assert torch.equal(closed, closed_twin)
        rtol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(out, want, rtol=rtol, atol=1e-9)
    atol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(s, s_twin, rtol=1e-5, atol=atol)
    torch.testing.assert_close(m, m_twin, rtol=1e-5, atol=atol)


def test_kernels_refuse_sizes_that_would_take_them_out_of_bounds(kernels: object) -> None:
    """The kernels index without bounds checks: a short vector, bounds past the end or a
    median buffer too small is a ValueError, not a write past the end."""
    from monitor_agent import signal_stats as st

    n = 64
    v = torch.rand(n)
    closed = torch.zeros(n, dtype=torch.uint8)
    gate = st.GateSettings()
    params = st._kernel_params(gate, 8, torch.float32)
    num, den = st._coefficients(gate.alpha_n, torch.float64, torch.device("cpu"))
    f64 = torch.float64

    def call(bounds: list[tuple[int, int]], buf: int, short: bool = False) -> None:
        kernels.statistics(  # type: ignore[attr-defined]
            (v, v[:-1] if short else v, v, v, v), closed, st._bounds_array(bounds), params, 2,
            st.MEDIAN_MAX, False, False, (num.numpy(), den.numpy()),
            torch.ones(2, dtype=f64).numpy(),
            (torch.empty((10, 2), dtype=f64), torch.empty((13, 2), dtype=f64), torch.empty(buf)),
            torch.empty(9 * 2 + 2, dtype=f64),
        )  # fmt: skip

    call([(0, n)], n)  # fits
    for bounds, buf, short in (([(0, n + 1)], n + 1, False), ([(0, n)], n - 1, False),
                               ([(0, n)], n, True)):  # fmt: skip
        with pytest.raises(ValueError, match=r"fit|buffer"):
            call(bounds, buf, short)
