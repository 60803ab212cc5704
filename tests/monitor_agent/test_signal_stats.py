"""signal_stats.layer_statistics against a plain per-field twin, in float64."""

from __future__ import annotations

import random

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


def test_layer_statistics_match_a_per_field_twin() -> None:
    gen = torch.Generator().manual_seed(random.randrange(10**9))
    sizes = [3000, 17, 4096, 1]  # below, at and around the median cap
    bounds, lo = [], 0
    for n in sizes:
        bounds.append((lo, lo + n))
        lo += n
    n = lo

    def rand() -> torch.Tensor:
        return torch.rand(n, generator=gen, dtype=torch.float64) + 0.01

    g = torch.randn(n, generator=gen, dtype=torch.float64)
    s, m2, w, m2p = rand(), rand(), rand(), rand()
    gate = st.GateSettings(alpha=1.0, soft_lambda=0.7, alpha_n=0.3, reservoir_evals=2)
    closed = torch.zeros(n, dtype=torch.uint8)
    closed_kept = closed.clone()
    workspace = st.Workspace(n, torch.float64, torch.device("cpu"))
    for _ in range(2):  # two closed evaluations in a row make a coordinate persistent
        per_layer, overall, rates = st.layer_statistics(g, s, m2, w, m2p, closed, bounds, 32, gate)
        kept = st.layer_statistics(
            g, s, m2, w, m2p, closed_kept, bounds, 32, gate, workspace
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
    nl = len(bounds)
    for i, field in enumerate(st.LAYER_FIELDS):
        got = [*per_layer[i].tolist(), float(overall[i])]
        if field == "gsnr_median":
            # exact up to MEDIAN_MAX coordinates; the whole vector (7,114) is subsampled
            assert got[:nl] == want[field][:nl]
            full = g * g / (32 * s)
            rank = float((full < got[-1]).double().mean())
            assert abs(rank - 0.5) < 0.02
        else:
            torch.testing.assert_close(
                torch.tensor(got, dtype=torch.float64),
                torch.tensor(want[field], dtype=torch.float64),
                rtol=1e-12, atol=1e-12,
            )  # fmt: skip


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
