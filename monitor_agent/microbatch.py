"""The exact micro-batch estimator (DESIGN §4.2.2) for ordinary gradient accumulation.

A post-accumulate-grad hook on each watched parameter sees p.grad after every
backward; the difference from the previous value is that micro-batch's contribution h_j.
With the usual ``(loss / K).backward()`` convention the micro-batch mean gradients are
u_j = K h_j, ḡ = Σ_j h_j, and Var_biased(u) = K Σ_j h_j² − ḡ², so the noise variance of ḡ
is Var_biased(u)/(K−1), the same leave-one-out estimate as with per-example gradients.

Only the sampled coordinates of each tensor are tracked, so the cost is two buffers of
the sample size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def sampled_flat(t: torch.Tensor, idx: slice | None, dtype: torch.dtype) -> torch.Tensor:
    """The chosen coordinates (a strided slice of the flattened tensor, or all) of a
    possibly sparse tensor as a flat vector of dtype. A slice is a view: the copy happens
    once, where the caller concatenates."""
    if t.is_sparse:
        t = t.coalesce().to_dense()
    flat = t.reshape(-1)
    if idx is not None:
        flat = flat[idx]
    return flat.to(dtype)


class MicroBatchCapture:
    """Accumulates Σ_j h_j² and K per parameter across the backwards of one step."""

    def __init__(
        self, params: list[nn.Parameter], idx: list[slice | None], dtype: torch.dtype
    ) -> None:
        self.params = params
        self.idx = dict(zip(params, idx, strict=True))
        self.dtype = dtype
        self.prev: dict[nn.Parameter, torch.Tensor] = {}
        self.sumsq: dict[nn.Parameter, torch.Tensor] = {}
        self.count: dict[nn.Parameter, int] = {}
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook)  # type: ignore[no-untyped-call]
            for p in params
        ]

    def _hook(self, p: Any) -> None:
        if p.grad is None:
            return
        g = sampled_flat(p.grad.detach(), self.idx[p], self.dtype)
        prev = self.prev.get(p)
        h = g if prev is None else g - prev
        if p in self.sumsq:
            self.sumsq[p].addcmul_(h, h)
        else:
            self.sumsq[p] = h * h
        self.prev[p] = g.clone()
        self.count[p] = self.count.get(p, 0) + 1

    def micro_batches(self) -> int:
        """K: the number of backwards seen this step (the smallest over parameters)."""
        return min((self.count.get(p, 0) for p in self.params), default=0)

    def noise(
        self, p: nn.Parameter, g: torch.Tensor, unscale: torch.Tensor | float = 1.0
    ) -> torch.Tensor:
        """Var_biased(u)/(K−1) for the sampled coordinates of p, given ḡ = g; ``unscale``
        (1/scale² under a GradScaler) brings the hooks' squares to g's scale."""
        k = self.count[p]
        var_b = (k * self.sumsq[p] * unscale - g * g).clamp_min(0)
        return var_b / (k - 1)

    def reset(self) -> None:
        """Forget this step's micro-batches (call after reading them)."""
        self.prev.clear()
        self.sumsq.clear()
        self.count.clear()

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


class BackwardCounter:
    """A single cheap hook that counts backwards per step, to detect accumulation."""

    def __init__(self, param: nn.Parameter) -> None:
        self.count = 0
        self._handle = param.register_post_accumulate_grad_hook(self._hook)  # type: ignore[no-untyped-call]

    def _hook(self, _p: Any) -> None:
        self.count += 1

    def remove(self) -> None:
        """Remove the hook."""
        self._handle.remove()
