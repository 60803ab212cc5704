"""The signal/noise statistics of DESIGN §4.1–4.3, as pure tensor functions.

Everything works on one flat vector of (sampled) coordinates in which each layer is a
contiguous range, so each statistic is a handful of kernels for all layers at once,
computed on the device where the gradients live.

Inputs, per coordinate k, read after backward and before the optimizer step:
* ``g``: the batch gradient ḡ_k of this step;
* ``s``: the noise variance of ḡ_k (≈ σ_k²/b); exact estimators give Σ_k/(b−1);
* ``m2``: the signal estimate the gate tests: ḡ² for exact estimators, m̂² (first-moment
  EMA) for the streaming one;
* ``w``: the optimizer's per-coordinate step scale (1 for SGD, 1/(√v̂+ε) for Adam).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from monitor_agent import cpu_kernels

# Per-layer vector names, in the order of the stacked result (DESIGN §4.6).
LAYER_FIELDS = (
    "occupancy",
    "occupancy_soft",
    "energy_in_channel",
    "loo_ratio",
    "loo_ratio_plain",
    "noise_scale",
    "gsnr_median",
    "population_fraction",
    "persistent_reservoir",
)
OCCUPANCY = LAYER_FIELDS.index("occupancy")
HIST_EDGES = [x / 2 for x in range(-16, 9)]  # log10 SNR from -8 to 4, 24 bins
_HIST_CLAMP = 1e-6  # values clamp to just under the top edge, into the last bin
_TINY = 1e-30
# The most a Workspace keeps between steps (the monitor also caps it at one
# parameter-sized buffer).
WORKSPACE_LIMIT = 64 * 2**20


class Workspace:
    """Scratch tensors of the per-step work, kept from one step to the next on the CPU.

    A fresh CPU tensor of a few hundred KiB or more can come in new pages (glibc maps large
    blocks, and trims the heap that the training step frees into), and the first write to
    each 4 KiB page faults: made anew each step, the agent's per-step tensors took 53
    faults a step inside its hook while a process trained the 784-512-512-10 benchmark
    MLP (bench/results/single_model.md), and they came from the same heap as the training
    step's own tensors, which then faulted more.
    A kept tensor faults once. On other devices the caching allocator already reuses
    memory, and past ``limit`` bytes kept in all a tensor is made per use again (the
    monitor's limit is one parameter-sized buffer, at most WORKSPACE_LIMIT)."""

    def __init__(
        self, n: int, dtype: torch.dtype, device: torch.device, limit: int = WORKSPACE_LIMIT
    ) -> None:
        self.n, self.dtype, self.device = n, dtype, device
        self.limit = limit if device.type == "cpu" else 0
        self._kept: dict[str, torch.Tensor] = {}
        self._objects: dict[Any, Any] = {}

    def get(
        self, name: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """An uninitialized tensor for ``name`` (n coordinates of the workspace's dtype by
        default), the same one on every call while it fits the limit."""
        shape = (self.n,) if shape is None else shape
        dtype = self.dtype if dtype is None else dtype
        kept = self._kept.get(name)
        if kept is not None and kept.shape == shape and kept.dtype == dtype:
            return kept
        self._kept.pop(name, None)  # another shape: the old tensor no longer counts
        t = torch.empty(shape, dtype=dtype, device=self.device)
        if self.nbytes() + t.numel() * t.element_size() <= self.limit:
            self._kept[name] = t
        return t

    def keep(self, key: Any, make: Any) -> Any:
        """The object ``make()`` returned for ``key``, made once and kept with the workspace
        (the fused kernels' plan: its scratch is small, and remaking it per call is the
        glue that cpu_statistics.Plan exists to avoid)."""
        if key not in self._objects:
            self._objects = {key: make()}  # one layout at a time
        return self._objects[key]

    def nbytes(self) -> int:
        """Bytes the workspace keeps between steps."""
        return sum(t.numel() * t.element_size() for t in self._kept.values())

    def kept(self) -> dict[str, torch.Tensor]:
        """The tensors kept between steps, by name."""
        return dict(self._kept)


@dataclass(frozen=True)
class GateSettings:
    """Constants of the gates: α of the batch gate, λ of the soft gate, α_n of the
    training-set gate (0 when the data set is infinite), and the reservoir patience."""

    alpha: float = 1.0
    soft_lambda: float = 1.0
    alpha_n: float = 0.0
    reservoir_evals: int = 10


def training_set_alpha(batch_size: int, dataset_size: int | None) -> float:
    """α_n = b/(n−b): the training-set noise floor in units of the batch noise (§4.5)."""
    if dataset_size is None or dataset_size <= batch_size:
        return 0.0
    return batch_size / (dataset_size - batch_size)


def soft_gate(m2: torch.Tensor, s: torch.Tensor, alpha: float, lam: float) -> torch.Tensor:
    """q = (m² − αŝ)₊ / ((m² − αŝ)₊ + λŝ + ε), in [0, 1)."""
    excess = (m2 - alpha * s).clamp_min(0)
    return excess / (excess + lam * s + _TINY)


# Rows of the per-coordinate matrix that layer_statistics sums per layer: the gate, the
# soft gate, q·ḡ², ḡ², w·ḡ², w·ŝ, ŝ, the population gate, the reservoir, w·m²_pop.
_ROWS = 10
# Three more rows extend the sums: coordinate counts (10), ones (11), GSNR medians (12).
# Every output is (numerator row · sums) / (denominator row · sums): LAYER_FIELDS in order,
# then T and Q. Q's coefficient on w·ŝ is −α_n, filled in per gate.
_NUMERATOR = [
    {0: 1.0}, {1: 1.0}, {2: 1.0}, {4: 1.0, 5: -1.0}, {3: 1.0, 6: -1.0}, {6: 1.0}, {12: 1.0},
    {7: 1.0}, {8: 1.0}, {9: 1.0}, {9: 1.0},
]  # fmt: skip
_DENOMINATOR = [10, 10, 3, 4, 3, 3, 11, 10, 11, 11, 11]
_COEFFICIENTS: dict[tuple[float, torch.dtype, torch.device], torch.Tensor] = {}


def layer_statistics(
    g: torch.Tensor,
    s: torch.Tensor,
    m2: torch.Tensor,
    w: torch.Tensor,
    m2_population: torch.Tensor,
    closed_run: torch.Tensor,
    bounds: list[tuple[int, int]],
    batch_size: int,
    gate: GateSettings,
    workspace: Workspace | None = None,
    fused: bool | None = None,
    plan: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-layer statistics (rows of LAYER_FIELDS × layers), the overall ones (one value
    per field) and the rates [T, Q] = [Σ w m²_pop, Σ w (m²_pop − α_n ŝ)] of §4.5, as
    device tensors, on an emitted step. ``closed_run`` counts, per coordinate, how many
    evaluations in a row its gate was closed; it is updated in place. ``workspace`` holds
    the scratch rows between calls (the monitor passes its own). ``fused``: None uses the
    fused CPU kernels where they are loaded and apply, False never, True always (loading
    them first; an error where they cannot apply); ``plan``: their plan for this layout
    (the monitor passes its own), else one made and kept with the workspace."""
    n = g.numel()
    scratch = workspace if workspace is not None else Workspace(n, g.dtype, g.device, limit=0)
    if fused:
        cpu_kernels.load(wait=True)
    if fused is not False:
        flat = fused_fields(
            (g, m2, s, w, m2_population), closed_run, bounds, batch_size, gate, scratch, plan
        )
        if flat is not None:
            flat = flat.to(g.dtype, copy=True)  # the workspace's buffer is the next call's
            overall, per_layer, rates = split_fields(flat, len(bounds))
            return per_layer.view(len(LAYER_FIELDS), len(bounds)), overall, rates
        if fused:
            raise ValueError(f"fused CPU statistics do not apply here ({cpu_kernels.state()})")
    sums, gsnr = _torch_sums(g, s, m2, w, m2_population, closed_run, bounds, batch_size, gate,
                             scratch)  # fmt: skip
    ext = torch.cat([sums, _layer_counts(bounds, g.dtype, g.device), gsnr.unsqueeze(0)])
    num, den = _coefficients(gate.alpha_n, g.dtype, g.device)
    out = (num @ ext).div_((den @ ext).add_(_TINY))
    nf = len(LAYER_FIELDS)
    return out[:nf, :-1], out[:nf, -1], out[nf:, -1]


_Flat = TypeVar("_Flat", list[float], torch.Tensor)


def split_fields(flat: _Flat, layers: int) -> tuple[_Flat, _Flat, _Flat]:
    """The overall fields, the per-layer fields (field-major) and [T, Q] of the fused
    kernels' flat vector of an emitted step."""
    nf = len(LAYER_FIELDS)
    return flat[:nf], flat[nf : nf + nf * layers], flat[nf + nf * layers :]


def fused_plan(
    n: int,
    bounds: list[tuple[int, int]],
    batch_size: int,
    gate: GateSettings,
    dtype: torch.dtype,
    samples: list[slice | None] | None = None,
) -> Any:
    """The fused CPU kernels' plan (cpu_statistics.Plan) for n coordinates in these layers,
    the gate's constants and ``dtype``, with the gradient's samples for its gather; None
    where the kernels are not loaded or ``dtype`` is not theirs."""
    kernels = cpu_kernels.loaded()
    if kernels is None or dtype not in kernels.DTYPES:
        return None
    num, den = _coefficients(gate.alpha_n, torch.float64, torch.device("cpu"))
    return kernels.Plan(
        n, bounds, samples, _kernel_params(gate, batch_size, dtype), gate.reservoir_evals,
        MEDIAN_MAX, (num.numpy(), den.numpy()), len(HIST_EDGES) - 1,
    )  # fmt: skip


def fused_fields(
    vectors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    closed_run: torch.Tensor,
    bounds: list[tuple[int, int]],
    batch_size: int,
    gate: GateSettings,
    scratch: Workspace,
    plan: Any = None,
) -> torch.Tensor | None:
    """The statistics of an emitted step by the fused CPU kernels, as one float64 vector
    [overall fields, per-layer fields (field-major), T, Q], or None where the kernels are
    not loaded or do not take these tensors. ``vectors`` = (g, m², ŝ, w, m²_pop). Run by
    ``plan`` when given (made for these bounds, gate and batch size), else by one made
    and kept with ``scratch``; the vector is the plan's: valid until its next run. After
    backward, before the optimizer step."""
    g = vectors[0]
    if plan is None:
        if cpu_kernels.loaded() is None:
            return None  # nothing kept: the plan is made once they have loaded
        key = (tuple(bounds), g.numel(), batch_size, gate, g.dtype)
        plan = scratch.keep(key, lambda: fused_plan(g.numel(), bounds, batch_size, gate, g.dtype))
    if plan is None or plan.run(vectors, closed_run) is None:
        return None
    out: torch.Tensor = torch.from_numpy(plan.out)
    return out


def _torch_sums(
    g: torch.Tensor,
    s: torch.Tensor,
    m2: torch.Tensor,
    w: torch.Tensor,
    m2_population: torch.Tensor,
    closed_run: torch.Tensor,
    bounds: list[tuple[int, int]],
    batch_size: int,
    gate: GateSettings,
    scratch: Workspace,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The _ROWS per-layer sums (layers and overall as columns) and the GSNR medians, in
    torch ops: any device."""
    # Each kernel here moves little data: every row is written straight into one
    # (rows × coordinates) buffer, comparisons write floats (a bool result costs ~4× a
    # float one on CPU), and the caller gets every field from these sums through two small
    # matrix products.
    n = g.numel()
    cols = scratch.get("statistics", (_ROWS, n))
    is_open, q, qg2, g2, wg2, ws, s_col, pop_open, persistent, wm2p = cols.unbind(0)
    torch.mul(g, g, out=g2)
    threshold = s if gate.alpha == 1 else gate.alpha * s
    torch.gt(m2, threshold, out=is_open)
    # ŝ + ε keeps the soft gate's denominator positive; ε (1e-30) is far below any sum.
    torch.add(s, _TINY, out=s_col)
    torch.sub(m2, threshold, out=q).clamp_(min=0)  # the gate's excess (m² − αŝ)₊
    q.div_(torch.add(q, s_col, alpha=gate.soft_lambda, out=persistent))  # row as scratch
    torch.mul(q, g2, out=qg2)
    torch.mul(w, g2, out=wg2)
    torch.mul(w, s_col, out=ws)
    # A saturating count of closed evaluations in a row (uint8: one byte a coordinate).
    closed = scratch.get("closed", (n,), torch.uint8)
    torch.le(m2, threshold, out=closed)
    closed_run.clamp_(max=253).add_(1).mul_(closed)
    torch.ge(closed_run, gate.reservoir_evals, out=persistent)
    floor = s if gate.alpha_n == 1 else gate.alpha_n * s
    torch.gt(m2_population, floor, out=pop_open)
    torch.mul(w, m2_population, out=wm2p)

    # Layers are contiguous ranges: one sum per slice is far cheaper than a scatter or
    # a matmul with a layer-indicator matrix.
    sums = torch.stack([cols[:, lo:hi].sum(dim=1) for lo, hi in bounds], dim=1)
    sums = torch.cat([sums, sums.sum(dim=1, keepdim=True)], dim=1)

    snr = torch.mul(s_col, batch_size, out=q)  # rows are free once summed
    torch.div(g2, snr, out=snr)
    gsnr = torch.stack([_median_of(snr[lo:hi]) for lo, hi in bounds] + [_median_of(snr)])
    return sums, gsnr


_PARAMS: dict[tuple[float, float, float, int, torch.dtype], Any] = {}


def _kernel_params(gate: GateSettings, batch_size: int, dtype: torch.dtype) -> Any:
    """[α, λ, α_n, ε, b, 0, 1] in the inputs' dtype, as the kernels round them, five
    entries that only the streaming pass reads (its plan's run sets them), and the log-SNR
    histograms' range: [lowest edge, the clamp's top, width]."""
    key = (gate.alpha, gate.soft_lambda, gate.alpha_n, batch_size, dtype)
    if key not in _PARAMS:
        values = [gate.alpha, gate.soft_lambda, gate.alpha_n, _TINY, float(batch_size), 0, 1]
        values += [0, 0, 0, 1, 1]
        lo, hi = HIST_EDGES[0], HIST_EDGES[-1]
        values += [lo, hi - _HIST_CLAMP, hi - lo]
        _PARAMS[key] = torch.tensor(values, dtype=dtype).numpy()
    return _PARAMS[key]


def _coefficients(
    alpha_n: float, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The numerator and denominator coefficient matrices (outputs × extended rows)."""
    key = (alpha_n, dtype, device)
    if key not in _COEFFICIENTS:
        num = torch.zeros((len(_NUMERATOR), _ROWS + 3), dtype=torch.float64)
        for i, row in enumerate(_NUMERATOR):
            for j, c in row.items():
                num[i, j] = c
        num[-1, 5] = -alpha_n
        den = torch.zeros_like(num)
        den[torch.arange(len(_DENOMINATOR)), torch.tensor(_DENOMINATOR)] = 1.0
        _COEFFICIENTS[key] = torch.stack([num, den]).to(dtype=dtype, device=device)
    both = _COEFFICIENTS[key]
    return both[0], both[1]


MEDIAN_MAX = 1024
_COUNTS: dict[tuple[tuple[tuple[int, int], ...], torch.dtype, torch.device], torch.Tensor] = {}


def _median_of(x: torch.Tensor) -> torch.Tensor:
    """The median of x, or of MEDIAN_MAX evenly spaced entries of it when x is longer: a
    selection over every coordinate was most of the cost of an emitted step, and the
    median of 1,024 draws sits within ±3.1 % in rank of the full one (2σ). (It was 4,096,
    ±1.6 %, at four times the selections' work on every emitted step.)"""
    n = x.numel()
    if n > MEDIAN_MAX:
        x = x[:: -(-n // MEDIAN_MAX)]
    return x.median()


def _layer_counts(
    bounds: list[tuple[int, int]], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Two rows, made once per layout: the coordinates of each layer and of all of them,
    and ones (the denominator of the fields that are plain counts)."""
    key = (tuple(bounds), dtype, device)
    if key not in _COUNTS:
        sizes = [hi - lo for lo, hi in bounds]
        sizes.append(sum(sizes))
        _COUNTS[key] = torch.tensor([sizes, [1] * len(sizes)], dtype=dtype, device=device)
    return _COUNTS[key]


def log_snr_histograms(
    g: torch.Tensor, s: torch.Tensor, bounds: list[tuple[int, int]]
) -> torch.Tensor:
    """Per-layer counts of log10(ḡ²/ŝ) in the bins of HIST_EDGES (outliers in the end
    bins), as one (layers × bins) tensor."""
    lo_edge, hi_edge = HIST_EDGES[0], HIST_EDGES[-1]
    bins = len(HIST_EDGES) - 1
    x = torch.log10((g * g + _TINY) / (s + _TINY)).clamp(lo_edge, hi_edge - _HIST_CLAMP)
    return torch.stack(
        [torch.histc(x[lo:hi], bins=bins, min=lo_edge, max=hi_edge) for lo, hi in bounds]
    )


def occupancy_stderr(occupancy: float, n: int) -> float:
    """Standard error √(O(1−O)/n) of an occupancy measured on n sampled coordinates."""
    if n <= 0:
        return math.nan
    return math.sqrt(max(occupancy * (1 - occupancy), 0.0) / n)
