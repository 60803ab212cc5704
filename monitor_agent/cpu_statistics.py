"""The agent's CPU work as fused kernels (numba) for ``watch(cpu_kernels=True)``: the
per-step gather and running moments, and the statistics of an emitted step (for the
streaming estimator together with that step's update of both moments).

On the CPU each torch op costs a few microseconds of dispatch however little data it
moves, and ``signal_stats.layer_statistics`` is ~40 of them: ~0.4–0.6 ms a call on the
784-512-512-10 benchmark MLP (27k sampled coordinates), most of the agent's cost at equal
cadence. Here one vectorized pass per layer computes all ten per-layer sums, one selection
per layer its median, and a small product the fields, in 0.15–0.31× the time
(bench/results/statistics_compile.md); the per-step update is one gather per tensor and one
kernel for both moments. Inside a training step every separate pass and call starts cold
(bench/results/agent_cold_calls.md), so for the streaming estimator the same pass also
updates the moments and forms m̂ and ŝ.

Importing this module compiles the kernels for float32 and float64 (or loads them from
numba's cache); ``cpu_kernels.load`` does that in a background thread so that no training
step waits for it. On the same inputs the sums match the torch path to float rounding (they
are summed in a different order) and the medians match it exactly (the same entries, the
same arithmetic, the same rank).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import torch

# Reassociation lets the reductions vectorize; no approximate reciprocals or functions,
# and no assumption that values are finite.
_SUM_FLAGS: dict[str, Any] = {
    "nogil": True,
    "cache": True,
    "boundscheck": False,
    "error_model": "numpy",
    "fastmath": {"reassoc", "contract", "nsz"},
}
# The medians' ratios must round as torch rounds them: no fast-math.
_EXACT_FLAGS: dict[str, Any] = {
    "nogil": True,
    "cache": True,
    "boundscheck": False,
    "error_model": "numpy",
}
# params: [alpha, soft_lambda, alpha_n, tiny, batch_size, 0, 1, w_s, w_m, 1 − β, c_m, c_s] in
# the inputs' dtype; the last five serve the streaming pass only.
_SIGNATURES = [
    f"void({t}[::1], {t}[::1], {t}[::1], {t}[::1], {t}[::1], u1[::1], i8[:, ::1], "
    f"{t}[::1], i8, i8, b1, b1, f8[:, ::1], f8[:, ::1], f8[::1], f8[:, ::1], f8[:, ::1], "
    f"{t}[::1], f8[::1])"
    for t in ("f4", "f8")
]
DTYPES = (torch.float32, torch.float64)


@numba.njit(inline="always")
def _lerp(start, end, weight):  # type: ignore[no-untyped-def]
    # torch.lerp for weights below ½ (every weight here): start + w·(end − start).
    return start + weight * (end - start)


@numba.njit(**_SUM_FLAGS)
def _pass(g, m, s, w, m2p, closed_run, params, evals, stream, own_m):  # type: ignore[no-untyped-def]
    # One layer's coordinates, indexed from 0: a loop from a bound read out of an array
    # kept LLVM from vectorizing it (negative-index wraparound), ~9x slower. ``stream``
    # (loop-invariant, so LLVM unswitches it): m is the first moment before this step and
    # s the raw second moment, both updated here, and the gate's m̂² and ŝ are computed
    # from them; otherwise m holds m² and s holds ŝ (any estimator), and m2p m²_pop.
    alpha, lam, alpha_n, tiny = params[0], params[1], params[2], params[3]
    zero, one = params[5], params[6]  # literals would promote float32 to float64
    ws, wm, bw, cm, cs = params[7], params[8], params[9], params[10], params[11]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a9 = zero
    persistent = 0
    for i in range(g.shape[0]):
        gi, wi = g[i], w[i]
        if stream:
            mi, si = m[i], s[i]
            d = gi - mi
            s_new = _lerp(si, d * d, ws)  # ws = 0 on a step without the update
            s[i] = s_new
            if own_m:
                m[i] = _lerp(mi, gi, wm)
            m_hat = _lerp(mi, gi, bw) * cm
            m2 = m_hat * m_hat
            s_hat = s_new * cs
            m2_pop = m2
        else:
            m2, s_hat, m2_pop = m[i], s[i], m2p[i]
        g2 = gi * gi
        sc = s_hat + tiny
        excess = m2 - alpha * s_hat
        kept = max(excess, zero)
        q = kept / (kept + lam * sc)
        is_open = excess > zero
        a0 += one if is_open else zero
        a1 += q
        a2 += q * g2
        a3 += g2
        a4 += wi * g2
        a5 += wi * sc
        a6 += sc
        a7 += one if m2_pop > alpha_n * s_hat else zero
        a9 += wi * m2_pop
        run = 0 if is_open else min(int(closed_run[i]), 253) + 1
        closed_run[i] = run
        persistent += 1 if run >= evals else 0
    return (a0, a1, a2, a3, a4, a5, a6, a7, a9), persistent


@numba.njit(**_SUM_FLAGS)
def _all_layers(g, m, s, w, m2p, closed_run, bounds, params, evals, stream, own_m, sums):  # type: ignore[no-untyped-def]
    # The _ROWS sums of signal_stats per layer (columns) and over all of them (last).
    nl = bounds.shape[0]
    for col in range(nl + 1):
        for row in range(sums.shape[0]):
            sums[row, col] = 0
    for layer in range(nl):
        lo, hi = bounds[layer, 0], bounds[layer, 1]
        r, persistent = _pass(
            g[lo:hi], m[lo:hi], s[lo:hi], w[lo:hi], m2p[lo:hi], closed_run[lo:hi], params,
            evals, stream, own_m,
        )  # fmt: skip
        for row in range(8):
            sums[row, layer] = r[row]
        sums[8, layer] = persistent
        sums[9, layer] = r[8]
        for row in range(10):
            sums[row, nl] += sums[row, layer]


@numba.njit(**_EXACT_FLAGS)
def _select(a, k):  # type: ignore[no-untyped-def]
    # Hoare's selection with a median-of-three pivot: a[k] after a partial sort of a
    # (in place). The sorted ends of each range stop both scans inside it.
    lo, hi = 0, a.shape[0] - 1
    while hi > lo:
        mid = (lo + hi) // 2
        if a[mid] < a[lo]:
            a[mid], a[lo] = a[lo], a[mid]
        if a[hi] < a[lo]:
            a[hi], a[lo] = a[lo], a[hi]
        if a[hi] < a[mid]:
            a[hi], a[mid] = a[mid], a[hi]
        pivot = a[mid]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while pivot < a[j]:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return a[k]  # between the two scans every entry equals the pivot
    return a[k]


@numba.njit(**_EXACT_FLAGS)
def _median_snr(g, s, s_scale, params, median_max, buf):  # type: ignore[no-untyped-def]
    # Lower median of ḡ²/(b(ŝ+ε)), ŝ = s·s_scale, over every ⌈n/median_max⌉-th entry, as
    # torch.median of the same strided view; NaN if any entry is NaN.
    tiny, batch = params[3], params[4]
    n = g.shape[0]
    step = 1 if n <= median_max else (n + median_max - 1) // median_max
    m = 0
    for i in range(0, n, step):
        x = g[i] * g[i] / ((s[i] * s_scale + tiny) * batch)
        if x != x:
            return x
        buf[m] = x
        m += 1
    return _select(buf[:m], (m - 1) // 2)


@numba.njit(**_EXACT_FLAGS)
def _medians(g, s, s_scale, bounds, params, median_max, buf, dst):  # type: ignore[no-untyped-def]
    # Each layer's GSNR median, then the overall one, into dst.
    nl = bounds.shape[0]
    for layer in range(nl):
        lo, hi = bounds[layer, 0], bounds[layer, 1]
        dst[layer] = _median_snr(g[lo:hi], s[lo:hi], s_scale, params, median_max, buf)
    dst[nl] = _median_snr(g, s, s_scale, params, median_max, buf)


# The per-step update: the strided gather of the sampled coordinates and the two running
# moments, each one kernel instead of a chain of torch ops (on the CPU each op's dispatch
# costs more than its arithmetic on ~10⁴ coordinates).
_GATHER_SIGNATURES = [f"f8({t}[::1], i8, i8, i8, {t}[::1], i8)" for t in ("f4", "f8")]
_MOMENT_SIGNATURES = [f"void({t}[::1], {t}[::1], {t}[::1], {t}, {t}, b1)" for t in ("f4", "f8")]


@numba.njit(_GATHER_SIGNATURES, **_SUM_FLAGS)
def _gather(src, start, step, count, dst, offset):  # type: ignore[no-untyped-def]
    # The sum (in float64) is finite exactly when every gathered value is.
    total = 0.0
    for i in range(count):
        v = src[start + i * step]
        dst[offset + i] = v
        total += v
    return total


@numba.njit(_MOMENT_SIGNATURES, **_EXACT_FLAGS)
def _moments(g, m, s, ws, wm, own_m):  # type: ignore[no-untyped-def]
    # m is the first moment before this step: s reads it before it moves (own_m), or it is
    # Adam's exp_avg, not ours to move.
    for i in range(g.shape[0]):
        d = g[i] - m[i]
        s[i] = _lerp(s[i], d * d, ws)
        if own_m:
            m[i] = _lerp(m[i], g[i], wm)


def _check_sizes(
    vectors: tuple[torch.Tensor, ...], bounds: Any, median_max: int, buf_size: int
) -> None:
    """The kernels index without bounds checks: refuse what would take them out of bounds."""
    n = vectors[0].numel()
    if any(t.numel() != n for t in vectors) or (bounds.shape[0] and int(bounds[-1, 1]) > n):
        raise ValueError(f"vectors or layer bounds do not fit {n} coordinates")
    if buf_size < min(median_max, n):
        raise ValueError(f"median buffer of {buf_size} < min(median_max={median_max}, {n})")


def _fits(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return (
        t.device.type == "cpu"
        and t.layout == torch.strided
        and t.dtype == dtype
        and t.is_contiguous()
        and dtype in DTYPES
    )


def gather(
    tensors: list[torch.Tensor | None],
    samples: list[slice | None],
    bounds: list[tuple[int, int]],
    out: torch.Tensor,
) -> float | None:
    """Write each tensor's sampled coordinates (a strided slice of it flattened, or all of
    it) into its range of ``out`` and return their sum (float64: finite exactly when every
    value is); None, with ``out`` untouched, unless every tensor is a dense contiguous CPU
    tensor of out's dtype. After backward, before the optimizer step."""
    if not _fits(out, out.dtype) or any(t is None or not _fits(t, out.dtype) for t in tensors):
        return None
    dst = out.numpy()
    total = 0.0
    for t, sample, (lo, hi) in zip(tensors, samples, bounds, strict=True):
        assert t is not None
        start, step = (0, 1) if sample is None else (sample.start, sample.step)
        total += _gather(t.detach().numpy().reshape(-1), start, step, hi - lo, dst, lo)
    return total


def update_moments(
    g: torch.Tensor,
    m_prev: torch.Tensor,
    s: torch.Tensor,
    own_m: bool,
    s_weight: float,
    m_weight: float,
) -> bool:
    """s ← s + w_s((g − m_prev)² − s), and with ``own_m`` (m_prev is the agent's own first
    moment) m_prev ← m_prev + w_m(g − m_prev) after s has read it, in place; as the torch
    path's lerps, to float rounding. False, with nothing changed, unless all three are
    contiguous CPU tensors of one dtype. Once per updating step, before the optimizer
    step."""
    if not all(_fits(t, g.dtype) for t in (g, m_prev, s)):
        return False
    _moments(g.numpy(), m_prev.numpy(), s.numpy(), s_weight, m_weight, own_m)
    return True


# The statistics of an emitted step: every per-layer sum in one pass per layer (for the
# streaming estimator the same pass updates both moments and forms m̂ and ŝ: inside a
# training step each separate pass and call found its data evicted and its code cold,
# bench/results/agent_cold_calls.md), the medians, and the fields.
@numba.njit(_SIGNATURES, **_SUM_FLAGS)
def _statistics(  # type: ignore[no-untyped-def]
    g, m, s, w, m2p, closed_run, bounds, params, evals, median_max, stream, own_m, num, den,
    counts, sums, ext, buf, out,
):  # fmt: skip
    _all_layers(g, m, s, w, m2p, closed_run, bounds, params, evals, stream, own_m, sums)
    nl = bounds.shape[0]
    # ext = [sums; coordinates; ones; GSNR medians] (ŝ = s·c_s on the streaming pass)
    _medians(g, s, params[11] if stream else params[6], bounds, params, median_max, buf, ext[12])
    for col in range(nl + 1):
        for row in range(10):
            ext[row, col] = sums[row, col]
        ext[10, col] = counts[col]
        ext[11, col] = 1.0
    # The fields, (num · ext) / (den · ext), laid out [overall, per layer (field-major), T, Q].
    nf = num.shape[0] - 2
    for field in range(num.shape[0]):
        for col in range(nl + 1):
            top = 0.0
            bottom = 0.0
            for k in range(ext.shape[0]):
                top += num[field, k] * ext[k, col]
                bottom += den[field, k] * ext[k, col]
            value = top / (bottom + params[3])
            if col == nl:
                out[field if field < nf else nf + nf * nl + field - nf] = value
            elif field < nf:
                out[nf + field * nl + col] = value


def accepts(vectors: tuple[torch.Tensor, ...], closed_run: torch.Tensor) -> bool:
    """Whether the statistics kernel takes these: contiguous 1-D CPU vectors of one float
    dtype (float32 or float64) and a contiguous uint8 closed_run."""
    return (
        all(_fits(t, vectors[0].dtype) and t.dim() == 1 for t in vectors)
        and closed_run.device.type == "cpu"
        and closed_run.dtype == torch.uint8
        and closed_run.is_contiguous()
    )


def statistics(
    vectors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    closed_run: torch.Tensor,
    bounds: np.ndarray[Any, Any],
    params: np.ndarray[Any, Any],
    reservoir_evals: int,
    median_max: int,
    stream: bool,
    own_m: bool,
    coefficients: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
    counts: np.ndarray[Any, Any],
    scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    out: torch.Tensor,
) -> None:
    """The fields of an emitted step into ``out`` (float64: the overall fields, the
    per-layer fields field-major, then [T, Q]), as signal_stats.layer_statistics gives
    them, to float rounding; ``closed_run`` updated in place. ``vectors`` = (g, m, s, w,
    m²_pop): with ``stream`` false, m holds m² and s holds ŝ; with ``stream`` true, m is
    the first moment before this step and s the raw second moment, both updated here with
    the weights in ``params`` (m only with ``own_m``), and m²_pop is not read. ``scratch``
    = (sums, ext, median buffer). Only for tensors that ``accepts`` takes; a ValueError for
    sizes that would take the kernel out of bounds. After backward, before the optimizer
    step."""
    sums, ext, buf = scratch
    _check_sizes((*vectors, closed_run), bounds, median_max, buf.shape[0])
    g, m, s, w, m2p = (t.numpy() for t in vectors)
    _statistics(
        g, m, s, w, m2p, closed_run.numpy(), bounds, params, reservoir_evals, median_max,
        stream, own_m, coefficients[0], coefficients[1], counts, sums.numpy(), ext.numpy(),
        buf.numpy(), out.numpy(),
    )  # fmt: skip
