"""The exact rank estimator (DESIGN §4.2.2) for DistributedDataParallel.

Per-rank gradients before the all-reduce are independent micro-batch gradients u_j. A
DDP communication hook squares the sampled coordinates of the local gradient, sums the
squares over ranks with one small all-reduce, then averages the bucket as DDP's default
hook does. Every rank then holds ḡ = (1/K) Σ u_j and Σ u_j², so the leave-one-out noise
Var_biased(u)/(K−1) (and every statistic built on it) is identical on all ranks.
"""

# No `from __future__ import annotations` here: DDP inspects the hook's annotations and
# accepts only the real dist.GradBucket class, not its name as a string.
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from monitor_agent.microbatch import sampled_flat


class RankCapture:
    """Communication hook state: Σ_j u_j² over ranks for the watched parameters."""

    def __init__(
        self,
        ddp_model: "nn.parallel.DistributedDataParallel",
        params: list[nn.Parameter],
        idx: list[slice | None],
        dtype: torch.dtype,
    ) -> None:
        self.world = dist.get_world_size()
        self.idx = {p: sl for p, sl in zip(params, idx, strict=True)}
        self.dtype = dtype
        self.sumsq: dict[torch.Tensor, torch.Tensor] = {}
        ddp_model.register_comm_hook(None, self._hook)

    def _hook(
        self,
        _state: Any,
        bucket: dist.GradBucket,  # type: ignore[name-defined]
    ) -> torch.futures.Future[torch.Tensor]:
        owners, pieces = [], []
        for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True):
            if p in self.idx:
                owners.append(p)
                pieces.append(sampled_flat(g, self.idx[p], self.dtype))
        if pieces:
            flat = torch.cat(pieces)
            squares = flat * flat
            dist.all_reduce(squares)
            offset = 0
            for p, piece in zip(owners, pieces, strict=True):
                self.sumsq[p] = squares[offset : offset + piece.numel()]
                offset += piece.numel()
        buffer = bucket.buffer()
        buffer.div_(self.world)
        fut = dist.all_reduce(buffer, async_op=True).get_future()

        def unwrap(f: torch.futures.Future[Any]) -> torch.Tensor:
            out: torch.Tensor = f.value()[0]
            return out

        chained: torch.futures.Future[torch.Tensor] = fut.then(unwrap)
        return chained

    def ready(self) -> bool:
        """True when this step's squares arrived for every watched parameter."""
        return self.world >= 2 and len(self.sumsq) == len(self.idx)

    def noise(self, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Var_biased(u)/(K−1) for the sampled coordinates of p, given ḡ = g."""
        k = self.world
        var_b = (self.sumsq[p] / k - g * g).clamp_min(0)
        return var_b / (k - 1)

    def reset(self) -> None:
        """Forget this step's squares."""
        self.sumsq.clear()
