"""Matrix-free spectral estimators: Lanczos with full reorthogonalization, and the
randomized Nyström approximation of a PSD matrix known only through a sketch.

References: Halko, Martinsson & Tropp (arXiv 0909.4061); Tropp, Yurtsever, Udell & Cevher
(arXiv 1706.05736) for the numerically stable Nyström recovery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LanczosResult:
    """Top Ritz values (descending), their Ritz vectors (columns), residual norms, and the
    number of matrix-vector products spent."""

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    matvecs: int


def lanczos(
    matvec: MatVec,
    n: int,
    k: int,
    *,
    max_iter: int | None = None,
    tol: float = 1e-10,
    start: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> LanczosResult:
    """Top-k eigenpairs of a symmetric operator of size n by Lanczos with full
    reorthogonalization.

    Stops when every one of the top-k Ritz pairs has residual ‖A y − θ y‖ = |β_m s_m| at
    most ``tol`` · max(|θ_1|, tiny), or after ``max_iter`` steps (default min(n, 4k + 40)).
    ``start`` (a vector or the columns of previous Ritz vectors, whose sum is used) warm
    starts the iteration.
    """
    k = min(k, n)
    max_iter = min(n, max_iter or 4 * k + 40)
    if start is not None:
        v = start.reshape(n, -1).sum(dim=1).to(dtype=dtype, device=device)
        noise = torch.randn(n, dtype=dtype, device=device, generator=generator)
        v = v + 1e-3 * v.norm() / (noise.norm() + 1e-300) * noise
    else:
        v = torch.randn(n, dtype=dtype, device=device, generator=generator)
    v = v / v.norm()
    basis = torch.zeros(max_iter + 1, n, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    basis[0] = v
    matvecs = 0
    values = vectors = residuals = torch.zeros(0, dtype=dtype)
    for j in range(max_iter):
        w = matvec(basis[j]).to(dtype)
        matvecs += 1
        alpha = float(torch.dot(w, basis[j]))
        alphas.append(alpha)
        # Full reorthogonalization, twice ("twice is enough") against every basis vector.
        q = basis[: j + 1]
        w = w - q.T @ (q @ w)
        w = w - q.T @ (q @ w)
        beta = float(w.norm())
        tri = torch.diag(torch.tensor(alphas, dtype=dtype))
        if betas:
            off = torch.tensor(betas, dtype=dtype)
            tri += torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(tri)
        order = torch.argsort(theta, descending=True)[:k]
        values = theta[order]
        residuals = (beta * s[-1, order]).abs()
        done = len(alphas) >= k and bool(
            (residuals <= tol * max(float(values.abs().max()), 1e-300)).all()
        )
        if done or beta < 1e-14 * max(abs(alpha), 1.0) or j + 1 == max_iter:
            vectors = (basis[: j + 1].T.to(s.device) @ s[:, order]).to(device)
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    return LanczosResult(values.to(device), vectors, residuals.to(device), matvecs)


def nystrom_eigs(
    sketch: torch.Tensor, omega: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenvalues (descending) and eigenvectors of a PSD matrix A from its sketch
    Y = A Ω, by the stable Nyström formula: shift by ν = ε‖Y‖, Cholesky of Ωᵀ Y_ν, an SVD
    of Y_ν C⁻¹, eigenvalues max(σ² − ν, 0)."""
    dtype = sketch.dtype
    eps = torch.finfo(dtype).eps
    nu = eps * float(torch.linalg.matrix_norm(sketch, ord=2)) * sketch.shape[0] ** 0.5
    nu = max(nu, eps)
    y_nu = sketch + nu * omega
    b = omega.T @ y_nu
    b = (b + b.T) / 2
    # Jitter until B is numerically positive definite (it is PSD in exact arithmetic).
    jitter = 0.0
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(b + jitter * torch.eye(b.shape[0], dtype=dtype))
        if int(info) == 0:
            break
        jitter = max(jitter * 10, nu)
    f = torch.linalg.solve_triangular(chol, y_nu.T, upper=False).T
    u, sigma, _ = torch.linalg.svd(f, full_matrices=False)
    lam = (sigma**2 - nu).clamp_min(0)
    return lam[:k], u[:, :k]
