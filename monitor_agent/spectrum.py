"""λ(W_s): the cumulative dissipation Gramian of the probe kernel (DESIGN §4.4).

Two paths:

* **exact** (n_p·R ≤ ``exact_max``, 4,096; beyond PRODUCTS_EXACT_MAX = 512 only when K̃
  can be built from blocks of per-example Jacobians): K̃ is built and diagonalized; over the
  window since the previous update, with the kernel frozen and the learning rates
  η_1 … η_m of its steps, the residual propagator is A = Π_i (I − η_i K̃), and
      W ← W + Φᵀ ½(I − AᵀA) Φ,   Φ ← A Φ.
  The increments telescope, so W = ½(I − ΦᵀΦ) exactly for a constant kernel (a linear
  model under MSE and SGD); in the small-step limit A → e^{−hK̃}, the continuous-time
  formula. Eigenvalues lie in [0, ½] while every step is stable (η λ ≤ 2).
* **sketch** (larger probes): Ŵ = Σ h K̃ (equal to W_s to first order while Φ ≈ I) is kept
  as a Nyström sketch Y += h K̃ Ω with a fixed Gaussian Ω of ℓ ≥ 2k columns; its top-k is
  recovered by the stable Nyström formula, and the current kernel's top-k by Lanczos,
  warm-started from the previous Ritz vectors. No past Jacobian is stored. The products
  are matmuls with J when it fits whole, with K̃ built from blocks of J when that fits,
  and VJP-then-JVP passes over the probe otherwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from monitor_agent.kernel import ProbeKernel
from monitor_agent.linalg import lanczos, nystrom_eigs

# Where K̃ can only come from kernel-vector products, the exact path needs n_p·R passes
# over the probe per update; beyond this many, the sketch (ℓ + Lanczos passes) is used.
PRODUCTS_EXACT_MAX = 512
# The auto schedule's longest interval: a safety net against a mismeasured step time, far
# enough out that the budget decides (a 21-minute update of a 256-sequence transformer probe
# on two CPU threads needs about 140,000 steps between updates for 3 %).
MAX_AUTO_EVERY = 1_000_000
W_CUTOFF = 0.25  # a mode of W_s above ¼ has dissipated more than half its residual
W_HAT_CUTOFF = 1.0  # Ŵ = Σ h K̃: integrated kernel of one e-folding


@dataclass
class SpectrumReport:
    """One spectrum update: eigenvalues (descending) and the derived numbers."""

    w_eigs: list[float]
    kernel_eigs: list[float]
    method: str
    probe_size: int
    scalars: dict[str, float] = field(default_factory=dict)


def derived_numbers(eigs: torch.Tensor, cutoff: float) -> dict[str, float]:
    """d_sig (count above the cutoff), the soft count Σ(1 − e^{−2λ}), the effective
    rank (Σλ)²/Σλ², and the eigengap at the cutoff."""
    lam = eigs.clamp_min(0)
    above = lam[lam > cutoff]
    below = lam[lam <= cutoff]
    gap = (float(above.min()) if above.numel() else cutoff) - (
        float(below.max()) if below.numel() else 0.0
    )
    total, sq = float(lam.sum()), float((lam * lam).sum())
    return {
        "d_sig": float(above.numel()),
        "d_sig_soft": float((1 - torch.exp(-2 * lam)).sum()),
        "effective_rank": total * total / sq if sq > 0 else 0.0,
        "eigengap": gap,
    }


class GramianTracker:
    """Keeps W_s (exact path) or the Nyström sketch of Ŵ (sketch path) across updates."""

    def __init__(
        self,
        kernel: ProbeKernel,
        k: int,
        *,
        exact_max: int = 4096,
        sketch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        self.kernel = kernel
        self.n = kernel.size
        self.k = min(k, self.n)
        self.exact = self.n <= exact_max and (
            self.n <= PRODUCTS_EXACT_MAX or kernel.blocks_build_explicit()
        )
        self.dtype = kernel._dtype()
        device = kernel.inputs.device
        gen = torch.Generator().manual_seed(seed)
        self.generator = gen
        if self.exact:
            self.phi = torch.eye(self.n, dtype=self.dtype, device=device)
            self.w = torch.zeros(self.n, self.n, dtype=self.dtype, device=device)
            self.k_prev: torch.Tensor | None = None
        else:
            ell = max(sketch_size or 2 * self.k + 8, 2 * self.k)
            self.omega = torch.randn(self.n, ell, generator=gen, dtype=self.dtype).to(device)
            self.sketch = torch.zeros(self.n, ell, dtype=self.dtype, device=device)
            self.ritz: torch.Tensor | None = None

    def update(self, lrs: list[float], precond: dict[str, torch.Tensor] | None) -> SpectrumReport:
        """Advance over a window whose steps had learning rates ``lrs`` with the current
        kernel, and report the spectrum."""
        with self.kernel.materialized():
            if self.exact:
                return self._update_exact(lrs, precond)
            return self._update_sketch(sum(lrs), precond)

    def _update_exact(
        self, lrs: list[float], precond: dict[str, torch.Tensor] | None
    ) -> SpectrumReport:
        kmat = self.kernel.explicit(precond)
        lam, u = torch.linalg.eigh(kmat)
        lam = lam.clamp_min(0)
        etas = torch.tensor(lrs or [0.0], dtype=self.dtype, device=lam.device)
        a = torch.prod(1 - etas[:, None] * lam[None, :], dim=0)
        g = u.T @ self.phi
        self.w += g.T @ (0.5 * (1 - a * a)[:, None] * g)
        self.w = (self.w + self.w.T) / 2
        self.phi = u @ (a[:, None] * g)
        w_lam, w_vec = torch.linalg.eigh(self.w)
        w_desc, w_vec = w_lam.flip(0), w_vec.flip(1)
        scalars = derived_numbers(w_desc, W_CUTOFF)
        if self.k_prev is not None:
            denom = float(torch.linalg.norm(self.k_prev) * torch.linalg.norm(kmat))
            scalars["kernel_drift"] = (
                1 - float((self.k_prev * kmat).sum()) / denom if denom else 0.0
            )
        self.k_prev = kmat
        res = self.kernel.residual().to(self.dtype)
        sig = w_vec[:, w_desc > W_CUTOFF]
        norm = float(res @ res)
        scalars["residual_in_channel"] = float((sig.T @ res).pow(2).sum()) / norm if norm else 0.0
        scalars["w_top1"] = float(w_desc[0])
        return SpectrumReport(
            w_eigs=w_desc[: self.k].tolist(),
            kernel_eigs=lam.flip(0)[: self.k].tolist(),
            method="exact",
            probe_size=self.kernel.n_probe,
            scalars=scalars,
        )

    def _update_sketch(self, h: float, precond: dict[str, torch.Tensor] | None) -> SpectrumReport:
        # The sketch and Lanczos need ℓ + up to 3k + 20 products. Unless J is held whole,
        # each product is a pass over the probe; one pass of per-example Jacobians, group
        # by group, builds K̃ itself (about R backward passes over the probe), after which
        # every product is a matmul.
        kmat: torch.Tensor | None = None
        if not self.kernel.holds_jacobian and self.kernel.blocks_build_explicit():
            kmat = self.kernel.explicit(precond)

        def product(vs: torch.Tensor) -> torch.Tensor:
            return kmat @ vs if kmat is not None else self.kernel.matmat(vs, precond)

        self.sketch += h * product(self.omega)
        w_eigs, w_vec = nystrom_eigs(self.sketch, self.omega, self.k)
        result = lanczos(
            lambda v: product(v.reshape(-1, 1)).reshape(-1),
            self.n,
            self.k,
            tol=1e-4,
            max_iter=3 * self.k + 20,
            start=self.ritz,
            dtype=self.dtype,
            device=self.sketch.device,
            generator=self.generator,
        )
        scalars = derived_numbers(w_eigs, W_HAT_CUTOFF)
        if self.ritz is not None:
            overlap = float((self.ritz.T @ result.vectors).pow(2).sum())
            scalars["kernel_drift"] = 1 - overlap / self.ritz.shape[1]
        self.ritz = result.vectors
        res = self.kernel.residual().to(self.dtype)
        sig = w_vec[:, w_eigs > W_HAT_CUTOFF]
        norm = float(res @ res)
        scalars["residual_in_channel"] = float((sig.T @ res).pow(2).sum()) / norm if norm else 0.0
        scalars["w_top1"] = float(w_eigs[0]) if w_eigs.numel() else 0.0
        return SpectrumReport(
            w_eigs=w_eigs.tolist(),
            kernel_eigs=result.values.tolist(),
            method="sketch",
            probe_size=self.kernel.n_probe,
            scalars=scalars,
        )


def collect_probe(probe: Any, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) from a tuple, or the first ``size`` examples of an iterable of
    (inputs, targets) batches such as a DataLoader."""
    if isinstance(probe, tuple | list) and len(probe) == 2 and isinstance(probe[0], torch.Tensor):
        return probe[0][:size], probe[1][:size]
    xs, ys, n = [], [], 0
    for batch in probe:
        x, y = batch[0], batch[1]
        xs.append(x)
        ys.append(y)
        n += x.shape[0]
        if n >= size:
            break
    if not xs:
        raise ValueError("probe: the data loader yielded nothing")
    return torch.cat(xs)[:size], torch.cat(ys)[:size]


class SpectrumSchedule:
    """When to update: every N optimizer steps, or 'auto' to keep the amortized cost of
    the updates under a budget (fraction of training time)."""

    def __init__(self, every: int | str, budget: float) -> None:
        self.auto = every == "auto"
        self.every = 500 if self.auto else int(every)
        if self.every < 1:
            raise ValueError("spectrum_every must be >= 1 or 'auto'")
        self.budget = budget
        self.last_step = 0
        self.last_time = time.perf_counter()

    def due(self, step: int) -> bool:
        """True when an update is due at this optimizer step."""
        return step - self.last_step >= self.every

    def done(self, step: int, cost_s: float) -> float:
        """Record an update that took cost_s; returns the amortized overhead since the
        previous one, and (auto) picks the next interval."""
        now = time.perf_counter()
        wall = max(now - self.last_time, 1e-9)
        steps = max(step - self.last_step, 1)
        amortized = cost_s / wall
        if self.auto:
            step_s = max((wall - cost_s) / steps, 1e-9)
            need = math.ceil(cost_s / (self.budget * step_s))
            self.every = int(min(MAX_AUTO_EVERY, max(10, need)))
        self.last_step, self.last_time = step, now
        return amortized
