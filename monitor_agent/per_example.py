"""Exact per-example sums of squared gradients, captured by module hooks (DESIGN §4.2.3).

For a step whose parameter gradient is the mean over B examples, p.grad = Σ_i ψ_i with
ψ_i the contribution of example i, so the per-example gradient is g_i = B ψ_i and the
biased per-example variance is Σ = B Σ_i ψ_i² − ḡ². This module accumulates
S2 = Σ_i ψ_i² per parameter:

* ``nn.Linear`` on 2-D inputs: ψ_i = δ_i x_iᵀ, so S2 = (δ²)ᵀ(x²), one extra matmul;
* ``nn.Linear`` on sequences: ψ_i = Σ_t δ_it x_itᵀ, materialized in chunks of examples;
* any other module that owns parameters and takes one tensor batched in dim 0: ψ_i is
  the VJP of the module at example i, by ``torch.func.vmap`` in chunks.

δ is the gradient of the loss with respect to the module's output, read by a tensor hook
on that output. Modules whose per-example gradient is not defined by their input alone
(BatchNorm in training mode) or that take several inputs are reported as unsupported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

UNSUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)


class PerExampleCapture:
    """Hooks that accumulate S2 = Σ_i ψ_i² and the example count for chosen parameters."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], chunk_size: int = 64) -> None:
        self.chunk_size = chunk_size
        self._active = False
        self.sumsq: dict[torch.Tensor, torch.Tensor] = {}
        self.examples: dict[torch.Tensor, int] = {}
        self.unsupported: set[torch.Tensor] = set()
        self._handles: list[Any] = []
        self._busy = False
        self._targets: list[tuple[nn.Module, list[tuple[str, nn.Parameter]]]] = []
        wanted = {id(p) for p in params}
        for module in model.modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) in wanted]
            if not own:
                continue
            if isinstance(module, UNSUPPORTED_TYPES):
                self.unsupported.update(p for _, p in own)
                continue
            self._targets.append((module, own))

    @property
    def active(self) -> bool:
        """Whether the next forward/backward is captured."""
        return self._active

    @active.setter
    def active(self, on: bool) -> None:
        # Hooks exist only while capturing: a module with a forward hook takes PyTorch's
        # slow call path, which costs every step even when the hook returns at once.
        if on and not self._handles:
            self._handles = [
                module.register_forward_hook(self._forward_hook(module, own))
                for module, own in self._targets
            ]
        elif not on and self._handles:
            self.remove()
        self._active = on

    def reset(self) -> None:
        """Forget what was captured (call after the optimizer step)."""
        self.sumsq.clear()
        self.examples.clear()

    def remove(self) -> None:
        """Remove every hook (capture stays off until ``active`` is set again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._active = False

    def _forward_hook(
        self, module: nn.Module, own: list[tuple[str, nn.Parameter]]
    ) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self.active or self._busy or not torch.is_grad_enabled():
                return
            if torch._C._functorch.peek_interpreter_stack() is not None:
                # Inside a torch.func transform over the model (the user's own
                # per-example gradients, say): not the training step's backward.
                return
            if len(args) != 1 or not isinstance(args[0], torch.Tensor):
                self.unsupported.update(p for _, p in own)
                return
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            x = args[0].detach()

            def on_grad(delta: torch.Tensor) -> None:
                self._capture(module, own, x, delta.detach())

            output.register_hook(on_grad)  # type: ignore[no-untyped-call]

        return hook

    def _capture(
        self,
        module: nn.Module,
        own: list[tuple[str, nn.Parameter]],
        x: torch.Tensor,
        delta: torch.Tensor,
    ) -> None:
        if isinstance(module, nn.Linear):
            self._linear(module, x, delta)
        else:
            self._generic(module, own, x, delta)
        for _, p in own:
            self.examples[p] = self.examples.get(p, 0) + x.shape[0]

    def _linear(self, module: nn.Linear, x: torch.Tensor, delta: torch.Tensor) -> None:
        weight, bias = module.weight, module.bias
        if x.dim() == 2:
            self._accumulate(weight, (delta * delta).T @ (x * x))
            if bias is not None:
                self._accumulate(bias, (delta * delta).sum(0))
            return
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        d3 = delta.reshape(delta.shape[0], -1, delta.shape[-1])
        s2w = torch.zeros_like(weight, dtype=delta.dtype)
        for lo in range(0, x3.shape[0], self.chunk_size):
            psi = torch.einsum(
                "bto,bti->boi", d3[lo : lo + self.chunk_size], x3[lo : lo + self.chunk_size]
            )
            s2w += (psi * psi).sum(0)
        self._accumulate(weight, s2w)
        if bias is not None:
            psi_b = d3.sum(1)
            self._accumulate(bias, (psi_b * psi_b).sum(0))

    def _generic(
        self,
        module: nn.Module,
        own: list[tuple[str, nn.Parameter]],
        x: torch.Tensor,
        delta: torch.Tensor,
    ) -> None:
        params = {n: p.detach() for n, p in own}
        buffers = dict(module.named_buffers(recurse=False))

        def one(x_i: torch.Tensor, d_i: torch.Tensor) -> dict[str, torch.Tensor]:
            def f(ps: dict[str, torch.Tensor]) -> torch.Tensor:
                out: torch.Tensor = functional_call(module, (ps, buffers), (x_i.unsqueeze(0),))
                return out.squeeze(0)

            _, pull = vjp(f, params)[:2]
            grads: dict[str, torch.Tensor] = pull(d_i)[0]
            return grads

        self._busy = True
        try:
            acc = {n: torch.zeros_like(p, dtype=delta.dtype) for n, p in params.items()}
            for lo in range(0, x.shape[0], self.chunk_size):
                per = vmap(one)(x[lo : lo + self.chunk_size], delta[lo : lo + self.chunk_size])
                for n, gi in per.items():
                    acc[n] += (gi * gi).sum(0)
        finally:
            self._busy = False
        for n, p in own:
            self._accumulate(p, acc[n])

    def _accumulate(self, p: torch.Tensor, s2: torch.Tensor) -> None:
        s2 = s2.detach().to(torch.float64 if p.dtype == torch.float64 else torch.float32)
        if p in self.sumsq:
            self.sumsq[p] += s2
        else:
            self.sumsq[p] = s2
