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

import torch

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
HIST_EDGES = [x / 2 for x in range(-16, 9)]  # log10 SNR from -8 to 4, 24 bins
_TINY = 1e-30


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


def layer_statistics(
    g: torch.Tensor,
    s: torch.Tensor,
    m2: torch.Tensor,
    w: torch.Tensor,
    m2_population: torch.Tensor,
    s_population: torch.Tensor,
    closed_run: torch.Tensor,
    bounds: list[tuple[int, int]],
    batch_size: int,
    gate: GateSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer statistics (rows of LAYER_FIELDS × layers) and the overall ones
    (one value per field), as two device tensors. ``closed_run`` counts, per coordinate,
    how many evaluations in a row its gate was closed; it is updated in place."""
    g2 = g * g
    is_open = m2 > gate.alpha * s
    q = soft_gate(m2, s, gate.alpha, gate.soft_lambda)
    # A saturating count of closed evaluations in a row (uint8: one byte a coordinate).
    closed_run.mul_(~is_open).add_((~is_open).to(closed_run.dtype)).clamp_(max=254)
    persistent = (closed_run >= gate.reservoir_evals).to(g.dtype)
    pop_open = (m2_population > gate.alpha_n * s_population).to(g.dtype)
    counts = torch.tensor([hi - lo for lo, hi in bounds], dtype=g.dtype, device=g.device)

    columns = torch.stack(
        [
            is_open.to(g.dtype),
            q,
            q * g2,
            g2,
            w * (g2 - s),
            w * g2,
            g2 - s,
            s,
            pop_open,
            persistent,
        ]
    )
    # Layers are contiguous ranges: one sum per slice is far cheaper than a scatter.
    per_layer_sums = torch.stack([columns[:, lo:hi].sum(dim=1) for lo, hi in bounds], dim=1)
    total_sums = per_layer_sums.sum(dim=1)

    def assemble(sums: torch.Tensor, count: torch.Tensor, gsnr: torch.Tensor) -> torch.Tensor:
        (occ, soft, qg2, g2s, wloo, wg2, loo, ss, pop, pers) = sums
        return torch.stack(
            [
                occ / count,
                soft / count,
                qg2 / (g2s + _TINY),
                wloo / (wg2 + _TINY),
                loo / (g2s + _TINY),
                ss / (g2s + _TINY),
                gsnr,
                pop / count,
                pers,
            ]
        )

    snr = g2 / (batch_size * s + _TINY)
    gsnr_layers = torch.stack([snr[lo:hi].median() for lo, hi in bounds])
    per_layer = assemble(per_layer_sums, counts, gsnr_layers)
    overall = assemble(
        total_sums.unsqueeze(1), counts.sum().unsqueeze(0), snr.median().unsqueeze(0)
    )
    return per_layer, overall.squeeze(1)


def log_snr_histograms(
    g: torch.Tensor, s: torch.Tensor, bounds: list[tuple[int, int]]
) -> torch.Tensor:
    """Per-layer counts of log10(ḡ²/ŝ) in the bins of HIST_EDGES (outliers in the end
    bins), as one (layers × bins) tensor."""
    lo_edge, hi_edge = HIST_EDGES[0], HIST_EDGES[-1]
    bins = len(HIST_EDGES) - 1
    x = torch.log10((g * g + _TINY) / (s + _TINY)).clamp(lo_edge, hi_edge - 1e-6)
    return torch.stack(
        [torch.histc(x[lo:hi], bins=bins, min=lo_edge, max=hi_edge) for lo, hi in bounds]
    )


def occupancy_stderr(occupancy: float, n: int) -> float:
    """Standard error √(O(1−O)/n) of an occupancy measured on n sampled coordinates."""
    if n <= 0:
        return math.nan
    return math.sqrt(max(occupancy * (1 - occupancy), 0.0) / n)
