"""signal_stats.layer_statistics against a plain per-field twin, in float64, on both of
its paths (torch ops, and the fused CPU kernels of monitor_agent.cpu_statistics)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from monitor_agent import signal_stats as st


def _twin(
    g: torch.Tensor, s: torch.Tensor, m2: torch.Tensor, w: torch.Tensor, m2p: torch.Tensor,
    bounds: list[tuple[int, int]], b: int, gate: st.GateSettings, persistent: torch.Tensor,
) -> dict[str, list[float]]:  # fmt: skip
    out: dict[str, list[float]] = {f: [] for f in st.LAYER_FIELDS}
    for lo, hi in [*bounds, (0, g.numel())]:
        gk, sk, mk, wk, pk = g[lo:hi], s[lo:hi], m2[lo:hi], w[lo:hi], m2p[lo:hi]
        g2 = gk * gk
        excess = (mk - gate.alpha * sk).clamp_min(0)
        q = excess / (excess + gate.soft_lambda * sk)
        out["occupancy"].append(float((mk > gate.alpha * sk).double().mean()))
        out["occupancy_soft"].append(float(q.mean()))
        out["energy_in_channel"].append(float((q * g2).sum() / g2.sum()))
        out["loo_ratio"].append(float((wk * (g2 - sk)).sum() / (wk * g2).sum()))
        out["loo_ratio_plain"].append(float((g2 - sk).sum() / g2.sum()))
        out["noise_scale"].append(float(sk.sum() / g2.sum()))
        out["gsnr_median"].append(float((g2 / (b * sk)).median()))
        out["population_fraction"].append(float((pk > gate.alpha_n * sk).double().mean()))
        out["persistent_reservoir"].append(float(persistent[lo:hi].sum()))
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
def test_layer_statistics_match_a_per_field_twin(fused: bool) -> None:
    gen = torch.Generator().manual_seed(random.randrange(10**9))
    sizes = [700, 17, 1024, 1, 3000]  # below, at and above the median cap (1,024)
    bounds = list(itertools.pairwise([0, *itertools.accumulate(sizes)]))
    n = sum(sizes)

    def rand() -> torch.Tensor:
        return torch.rand(n, generator=gen, dtype=torch.float64) + 0.01

    g = torch.randn(n, generator=gen, dtype=torch.float64)
    s, m2, w, m2p = rand(), rand(), rand(), rand()
    gate = st.GateSettings(alpha=1.0, soft_lambda=0.7, alpha_n=0.3, reservoir_evals=2)
    closed = torch.zeros(n, dtype=torch.uint8)
    closed_kept = closed.clone()
    workspace = st.Workspace(n, torch.float64, torch.device("cpu"))
    for _ in range(2):  # two closed evaluations in a row make a coordinate persistent
        per_layer, overall, rates = st.layer_statistics(
            g, s, m2, w, m2p, closed, bounds, 32, gate, fused=fused
        )
        kept = st.layer_statistics(
            g, s, m2, w, m2p, closed_kept, bounds, 32, gate, workspace, fused=fused
        )  # the same numbers when the scratch rows are kept and reused
        for a, b in zip((per_layer, overall, rates), kept, strict=True):
            assert torch.equal(a, b)
    persistent = (m2 <= s).double()
    torch.testing.assert_close(
        rates,
        torch.stack([(w * m2p).sum(), (w * (m2p - gate.alpha_n * s)).sum()]),
        rtol=1e-12, atol=1e-12,
    )  # fmt: skip
    want = _twin(g, s, m2, w, m2p, bounds, 32, gate, persistent)
    for i, field in enumerate(st.LAYER_FIELDS):
        got = [*per_layer[i].tolist(), float(overall[i])]
        if field == "gsnr_median":
            # exact up to MEDIAN_MAX coordinates; the last layer (3,000) and the whole
            # vector (4,742) are subsampled to at most 1,024 entries: rank within ±3.1 %
            # (2σ), ±4.7 % (3σ) asserted
            assert got[:4] == want[field][:4]
            full = g * g / (32 * s)
            for value, (lo, hi) in ((got[4], bounds[4]), (got[-1], (0, n))):
                rank = float((full[lo:hi] < value).double().mean())
                assert abs(rank - 0.5) < 0.047
        else:
            torch.testing.assert_close(
                torch.tensor(got, dtype=torch.float64),
                torch.tensor(want[field], dtype=torch.float64),
                rtol=1e-12, atol=1e-12,
            )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_kernels_match_the_torch_path(dtype: torch.dtype) -> None:
    """The same sums to float rounding, the same medians exactly (ties included), the same
    reservoir counts, over several evaluations in a row; NaN medians where torch's are."""
    gen = torch.Generator().manual_seed(random.randrange(10**9))
    sizes = [5000, 1, 4097, 9000, 64]
    bounds = list(itertools.pairwise([0, *itertools.accumulate(sizes)]))
    n = sum(sizes)
    gate = st.GateSettings(alpha=1.0, soft_lambda=1.0, alpha_n=0.05, reservoir_evals=3)
    closed = [torch.zeros(n, dtype=torch.uint8) for _ in range(2)]
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for evaluation in range(5):
        g = torch.randn(n, generator=gen, dtype=dtype)
        if evaluation % 2:
            g = g.mul(4).round()  # many equal ratios: ties at the median
        s = torch.rand(n, generator=gen, dtype=dtype)
        s[::7] = 0  # ŝ = 0 happens (a coordinate without noise)
        m2 = g * g * 2 * torch.rand(n, generator=gen, dtype=dtype)
        w = torch.rand(n, generator=gen, dtype=dtype)
        if evaluation == 4:
            g[bounds[3][0] + 5] = float("nan")  # one layer's median and the overall are NaN
        out = [
            st.layer_statistics(g, s, m2, w, m2, c, bounds, 64, gate, fused=f)
            for c, f in zip(closed, (False, True), strict=True)
        ]
        assert torch.equal(closed[0], closed[1])
        for a, b in zip(out[0], out[1], strict=True):
            torch.testing.assert_close(a, b, rtol=rtol, atol=0, equal_nan=True)
        gsnr = st.LAYER_FIELDS.index("gsnr_median")
        for part in (0, 1):  # per layer, overall: bit for bit
            exact = (out[0][part][gsnr], out[1][part][gsnr])
            torch.testing.assert_close(*exact, rtol=0, atol=0, equal_nan=True)
        if evaluation == 4:
            assert out[1][0][gsnr].isnan().tolist() == [False, False, False, True, False]


def test_fused_kernels_refuse_what_they_cannot_take() -> None:
    g = torch.rand(10, dtype=torch.float16)
    closed = torch.zeros(10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="do not apply"):
        st.layer_statistics(g, g, g, g, g, closed, [(0, 10)], 4, st.GateSettings(), fused=True)
    strided = torch.rand(20)[::2]
    with pytest.raises(ValueError, match="do not apply"):
        st.layer_statistics(
            strided, strided, strided, strided, strided, closed, [(0, 10)], 4,
            st.GateSettings(), fused=True,
        )  # fmt: skip
    # None takes whichever applies: the torch path here
    per_layer, _, _ = st.layer_statistics(g, g, g, g, g, closed, [(0, 10)], 4, st.GateSettings())
    assert per_layer.dtype == torch.float16


def test_workspace_reuses_its_tensors_within_its_limit() -> None:
    cpu = torch.device("cpu")
    ws = st.Workspace(1000, torch.float32, cpu, limit=6000)
    rows = ws.get("rows", (1, 1000))
    assert ws.get("rows", (1, 1000)) is rows  # kept: the same memory on every call
    assert ws.get("rows", (2, 1000)) is not rows  # a new shape replaces the kept tensor
    assert ws.nbytes() == 0  # 8,000 bytes do not fit a 6,000-byte limit: made per use
    v = ws.get("v")
    assert v.shape == (1000,) and v.dtype == torch.float32
    assert ws.get("v") is v and ws.nbytes() == 4000
    small = ws.get("mask", (1000,), torch.uint8)
    assert ws.get("mask", (1000,), torch.uint8) is small and ws.nbytes() == 5000
    assert ws.get("w") is not ws.get("w")  # past the limit: a fresh tensor each call
    meta = st.Workspace(1000, torch.float32, torch.device("meta"))
    assert meta.get("v") is not meta.get("v") and meta.nbytes() == 0  # off the CPU: never kept
