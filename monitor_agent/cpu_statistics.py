"""The agent's CPU work as fused kernels (numba) for ``watch(cpu_kernels=True)``: the
per-step gather and running moments, and the statistics of an emitted step (for the
streaming estimator together with that step's update of both moments).

On the CPU each torch op costs a few microseconds of dispatch however little data it
moves, and ``signal_stats.layer_statistics`` is ~40 of them: ~0.4–0.6 ms a call on the
784-512-512-10 benchmark MLP (27k sampled coordinates), most of the agent's cost at equal
cadence. Here one vectorized pass per layer computes all ten per-layer sums, one selection
per layer its median, and a small product the fields, in 0.15–0.31× the time
(bench/results/statistics_compile.md); the per-step update is one gather call for all
tensors (read by address) and one kernel for both moments. Inside a training step every
separate pass and call starts cold (bench/results/agent_cold_calls.md), so for the streaming
estimator an emitted step is one call (``Plan.run``): the gather, the update of the moments,
m̂ and ŝ, w and the histograms when due, and the statistics.

Importing this module compiles the kernels for float32 and float64 (or loads them from
numba's cache); ``cpu_kernels.load`` does that in a background thread so that no training
step waits for it. On the same inputs the sums match the torch path to float rounding (they
are summed in a different order) and the medians match it exactly (the same entries, the
same arithmetic, the same rank).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numba
import numpy as np
import torch
from numba.core import types as nb_types
from numba.extending import intrinsic

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
# params: [alpha, soft_lambda, alpha_n, tiny, batch_size, 0, 1, w_s, w_m, 1 − β, c_m, c_s,
# lo, hi, width] in the inputs' dtype; w_s … c_s serve the streaming pass only, and lo, hi
# (the clamp's top) and width (of the whole range) are the log-SNR histograms' geometry.
_SIGNATURES = [
    f"f8({t}[::1], {t}[::1], {t}[::1], {t}[::1], {t}[::1], u1[::1], i8[:, ::1], "
    f"{t}[::1], i8, i8, b1, b1, f8[:, ::1], f8[:, ::1], f8[::1], f8[:, ::1], f8[:, ::1], "
    f"{t}[::1], f8[::1], i8[:, ::1], b1, {t}[:, ::1], b1, f8[:, ::1], b1)"
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


@numba.njit(**_EXACT_FLAGS)
def _histogram(g, s, s_scale, params, hist):  # type: ignore[no-untyped-def]
    # Counts of log10(ḡ²/ŝ), ŝ = s·s_scale, into hist (zeroed first) as
    # signal_stats.log_snr_histograms counts them: clamped into the range, binned as
    # torch.histc bins. Its own loop: inside the statistics pass it kept LLVM from
    # vectorizing the sums (2x slower with no histogram due).
    tiny, one = params[3], params[6]
    lo, top, width = params[12], params[13], params[14]
    bins = hist.shape[0]
    scale = one * bins  # in the inputs' dtype, as torch.histc scales
    for k in range(bins):
        hist[k] = 0
    for i in range(g.shape[0]):
        x = np.log10((g[i] * g[i] + tiny) / (s[i] * s_scale + tiny))
        if x == x:
            x = min(max(x, lo), top)
            b = int((x - lo) * scale / width)
            hist[min(max(b, 0), bins - 1)] += 1.0


@numba.njit(**_SUM_FLAGS)
def _all_layers(  # type: ignore[no-untyped-def]
    g, m, s, w, m2p, closed_run, bounds, params, evals, stream, own_m, sums, with_hist, hist
):
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
        if with_hist:  # ŝ = s·c_s on the streaming pass
            s_scale = params[11] if stream else params[6]
            _histogram(g[lo:hi], s[lo:hi], s_scale, params, hist[layer])
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
# costs more than its arithmetic on ~10⁴ coordinates). The gather reads every tensor through
# its address in one call: a call per tensor, and a numpy view of each, cost more than the
# copy inside a training step, where each call starts cold.
_GATHER_SIGNATURES = [f"f8(i8[:, ::1], i8, i8[:, ::1], {t}[::1])" for t in ("f4", "f8")]
_MOMENT_SIGNATURES = [f"void({t}[::1], {t}[::1], {t}[::1], {t}, {t}, b1)" for t in ("f4", "f8")]
# Columns of a plan's layout: per layer, the gradient's address, the sample's start and
# step, and the address of the optimizer's second moment (for w).
_ADDRESS, _START, _STEP, _V_ADDRESS = 0, 1, 2, 3


@intrinsic
def _pointer(typingctx, address, like):  # type: ignore[no-untyped-def]
    # The integer address as a pointer to like's element type (numba has no such cast).
    target = nb_types.CPointer(like.dtype)  # type: ignore[no-untyped-call]

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], context.get_value_type(target))

    return target(address, like), codegen


@numba.njit(**_SUM_FLAGS)
def _gather_layers(layout, column, bounds, dst):  # type: ignore[no-untyped-def]
    # Each layer's sample, read from the tensor at layout[layer, column], into its range of
    # dst; the float64 sum is finite exactly when every gathered value is.
    total = 0.0
    for layer in range(bounds.shape[0]):
        lo, hi = bounds[layer, 0], bounds[layer, 1]
        if hi == lo:
            continue
        start, step = layout[layer, _START], layout[layer, _STEP]
        address = layout[layer, column]
        span = start + (hi - lo - 1) * step + 1
        src = numba.carray(_pointer(address, dst), (span,))  # type: ignore[attr-defined,call-arg]
        part = dst[lo:hi]
        for i in range(hi - lo):
            v = src[start + i * step]
            part[i] = v
            total += v
    return total


@numba.njit(_GATHER_SIGNATURES, **_SUM_FLAGS)
def _gather(layout, column, bounds, dst):  # type: ignore[no-untyped-def]
    return _gather_layers(layout, column, bounds, dst)


@numba.njit(_MOMENT_SIGNATURES, **_EXACT_FLAGS)
def _moments(g, m, s, ws, wm, own_m):  # type: ignore[no-untyped-def]
    # m is the first moment before this step: s reads it before it moves (own_m), or it is
    # Adam's exp_avg, not ours to move.
    for i in range(g.shape[0]):
        d = g[i] - m[i]
        s[i] = _lerp(s[i], d * d, ws)
        if own_m:
            m[i] = _lerp(m[i], g[i], wm)


@numba.njit(**_EXACT_FLAGS)
def _step_scale(w, bounds, constants):  # type: ignore[no-untyped-def]
    # w holds the sampled v (Adam's exp_avg_sq); in place, lr / (√(v / (1 − β₂ᵗ)) + ε) per
    # layer, rounded as the torch path's ops round it.
    for layer in range(bounds.shape[0]):
        lo, hi = bounds[layer, 0], bounds[layer, 1]
        lr, correction, eps = constants[layer, 0], constants[layer, 1], constants[layer, 2]
        for i in range(lo, hi):
            w[i] = lr / (np.sqrt(w[i] / correction) + eps)


def _fits(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernels can read t as a flat array of ``dtype``: a dense contiguous CPU
    tensor of that dtype."""
    # is_cpu rather than device.type, which builds a device object: this runs for every
    # gradient on every emitted step.
    return t.is_cpu and t.layout == torch.strided and t.dtype == dtype and t.is_contiguous()


def _layout(
    samples: list[slice | None], bounds: list[tuple[int, int]]
) -> tuple[np.ndarray[Any, Any], list[int]]:
    """The (layers × 4) layout array with each sample's start and step filled in, and the
    fewest elements each source tensor must hold."""
    layout = np.zeros((len(bounds), 4), dtype=np.int64)
    need = []
    for row, sample, (lo, hi) in zip(layout, samples, bounds, strict=True):
        start, step = (0, 1) if sample is None else (sample.start or 0, sample.step or 1)
        row[_START], row[_STEP] = start, step
        need.append(start + (hi - lo - 1) * step + 1 if hi > lo else 0)
    return layout, need


def _addresses(
    tensors: Sequence[torch.Tensor | None],
    dtype: torch.dtype,
    need: list[int],
    layout: np.ndarray[Any, Any],
    column: int,
) -> bool:
    """Write each tensor's address into ``layout[:, column]``; False, with the column left
    as it was, unless every tensor is a dense contiguous CPU tensor of ``dtype``. A
    ValueError for a tensor too short for its sample (the kernels do not check bounds)."""
    if len(tensors) != len(need):
        raise ValueError(f"{len(tensors)} tensors for {len(need)} layers")
    for t, n in zip(tensors, need, strict=True):
        if t is None or not _fits(t, dtype):
            return False
        if t.numel() < n:
            raise ValueError(f"a tensor of {t.numel()} elements for a sample reaching {n}")
    for row, t in enumerate(tensors):
        assert t is not None
        layout[row, column] = t.data_ptr()
    return True


# The statistics of an emitted step: every per-layer sum in one pass per layer (for the
# streaming estimator the same pass updates both moments and forms m̂ and ŝ, and the
# monitor's gather, w and histograms join it: inside a training step each separate pass and
# call found its data evicted and its code cold, bench/results/agent_cold_calls.md), the
# medians, and the fields.
@numba.njit(_SIGNATURES, **_SUM_FLAGS)
def _statistics(  # type: ignore[no-untyped-def]
    g, m, s, w, m2p, closed_run, bounds, params, evals, median_max, stream, own_m, num, den,
    counts, sums, ext, buf, out, layout, gather_g, constants, refresh_w, hist, with_hist,
):  # fmt: skip
    total = 0.0
    if gather_g:
        total = _gather_layers(layout, _ADDRESS, bounds, g)
        if not np.isfinite(total):
            return total  # nothing else changes: the caller masks the step
    if refresh_w:
        _gather_layers(layout, _V_ADDRESS, bounds, w)
        _step_scale(w, bounds, constants)
    _all_layers(
        g, m, s, w, m2p, closed_run, bounds, params, evals, stream, own_m, sums, with_hist, hist
    )
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
    return total


class Plan:
    """The statistics kernel's fixed inputs for one layout of layers (bounds, samples,
    gate constants, coefficients, scratch), made once, and the entry that runs it.

    The vectors it is given are kept with their numpy views and checked when they change
    (the monitor passes the same buffers every step): made anew on every call, with a
    gather call per tensor, that glue kept the monitor's hook ~20 % longer
    (bench/results/agent_breakdown_cpu_kernels.md's 'hook' column, docs/performance.md)."""

    def __init__(
        self,
        n: int,
        bounds: list[tuple[int, int]],
        samples: list[slice | None] | None,
        params: np.ndarray[Any, Any],
        reservoir_evals: int,
        median_max: int,
        coefficients: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
        bins: int,
    ) -> None:
        dtype = torch.float32 if params.dtype == np.float32 else torch.float64
        ends = [0, *(x for pair in bounds for x in pair), n]
        if any(b < a for a, b in itertools.pairwise(ends)):
            raise ValueError(f"layer bounds {bounds} are not ordered ranges within {n}")
        nl = len(bounds)
        self.n, self.dtype, self.params = n, dtype, params.copy()
        self.bounds = np.array(bounds, dtype=np.int64).reshape(-1, 2)
        self.layout, self._need = _layout(samples or [None] * nl, bounds)
        self.evals, self.median_max = reservoir_evals, median_max
        self.num, self.den = coefficients
        sizes = [hi - lo for lo, hi in bounds]
        self.counts = np.array([*sizes, sum(sizes)], dtype=np.float64)
        rows = self.num.shape[1] - 3
        self.sums = np.zeros((rows, nl + 1))
        self.ext = np.zeros((rows + 3, nl + 1))
        self.buf = np.zeros(max(min(median_max, n), 1), dtype=params.dtype)
        self.constants = np.ones((nl, 3), dtype=params.dtype)
        self.hist = np.zeros((nl, bins))  # counts of the last run with ``hist``
        nf = self.num.shape[0] - 2
        self.out = np.zeros(nf * (nl + 1) + 2)  # the fields of the last run
        self._views: dict[str, tuple[torch.Tensor, Any]] = {}

    def _view(self, slot: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> Any:
        """t's numpy view, kept with t under ``slot`` (one per role, so that a buffer that
        changes does not pile up views); None where the kernels cannot take t."""
        kept = self._views.get(slot)
        if kept is not None and kept[0] is t:
            return kept[1]
        if not (_fits(t, dtype or self.dtype) and t.dim() == 1):
            return None
        if t.numel() != self.n:
            raise ValueError(f"a vector of {t.numel()} coordinates for a plan of {self.n}")
        view = t.numpy()
        self._views[slot] = (t, view)
        return view

    def gather(
        self, tensors: Sequence[torch.Tensor | None], out: torch.Tensor, slot: str = "g"
    ) -> float | None:
        """Write each tensor's sample (a strided slice of it flattened, or all of it) into
        its layer's range of ``out`` and return their sum (float64: finite exactly when
        every value is); None, with ``out`` untouched, unless ``out`` and every tensor are
        dense contiguous CPU tensors of the plan's dtype. ``slot`` names out's role (the
        gradient, Adam's exp_avg). After backward, before the optimizer step."""
        dst = self._view(slot, out)
        if dst is None or not _addresses(tensors, self.dtype, self._need, self.layout, _ADDRESS):
            return None
        return float(_gather(self.layout, _ADDRESS, self.bounds, dst))

    def update_moments(
        self,
        g: torch.Tensor,
        m_prev: torch.Tensor,
        s: torch.Tensor,
        own_m: bool,
        s_weight: float,
        m_weight: float,
    ) -> bool:
        """s ← s + w_s((g − m_prev)² − s), and with ``own_m`` (m_prev is the agent's own
        first moment) m_prev ← m_prev + w_m(g − m_prev) after s has read it, in place; as
        the torch path's lerps, to float rounding. False, with nothing changed, unless all
        three are contiguous CPU vectors of the plan's dtype and size. Once per updating
        step that emits nothing, before the optimizer step."""
        gv, mv, sv = (self._view(slot, t) for slot, t in (("g", g), ("m", m_prev), ("s", s)))
        if gv is None or mv is None or sv is None:
            return False
        _moments(gv, mv, sv, s_weight, m_weight, own_m)
        return True

    def run(
        self,
        vectors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        closed_run: torch.Tensor,
        stream: tuple[float, float, float, float, float] | None = None,
        own_m: bool = False,
        sources: Sequence[torch.Tensor | None] | None = None,
        step_scale: tuple[Sequence[torch.Tensor], list[tuple[float, float, float]]] | None = None,
        hist: bool = False,
    ) -> float | None:
        """The fields of an emitted step into ``out`` (float64: the overall fields, the
        per-layer fields field-major, then [T, Q]), as signal_stats.layer_statistics gives
        them, to float rounding; ``closed_run`` updated in place. ``vectors`` = (g, m, s,
        w, m²_pop): without ``stream``, m holds m² and s holds ŝ (any estimator); with
        ``stream`` = (w_s, w_m, 1 − β, c_m, c_s), m is the first moment before this step and
        s the raw second moment, both updated here (m only with ``own_m``),
        m̂ = c_m·lerp(m, g, 1 − β) and ŝ = c_s·s are formed from them, and m²_pop is not
        read.

        ``sources``: the gradients, one per layer, whose samples are gathered into g first;
        ``step_scale`` = (Adam's exp_avg_sq per layer, (lr, 1 − β₂ᵗ, ε) per layer): w is
        measured into w first; ``hist``: log10(ḡ²/ŝ) histograms into ``hist``.

        Returns the gathered gradient's sum (0 without ``sources``): a non-finite sum
        means only g was written. None, with nothing changed, where the kernel does not take
        these tensors (another device, dtype or layout); a ValueError for sizes that would
        take it out of bounds. After backward, before the optimizer step."""
        slots = ("g", "m", "s", "w", "m2p")
        views = [self._view(slot, t) for slot, t in zip(slots, vectors, strict=True)]
        views.append(self._view("closed_run", closed_run, torch.uint8))
        if any(v is None for v in views):
            return None
        if sources is not None and not _addresses(
            sources, self.dtype, self._need, self.layout, _ADDRESS
        ):
            return None
        if step_scale is not None:
            if not _addresses(step_scale[0], self.dtype, self._need, self.layout, _V_ADDRESS):
                return None
            self.constants[:] = step_scale[1]
        if stream is not None:
            self.params[7:12] = stream
        g, m, s, w, m2p, closed = views
        return float(
            _statistics(
                g, m, s, w, m2p, closed, self.bounds, self.params, self.evals,
                self.median_max, stream is not None, own_m, self.num, self.den, self.counts,
                self.sums, self.ext, self.buf, self.out, self.layout, sources is not None,
                self.constants, step_scale is not None, self.hist, hist,
            )
        )  # fmt: skip
