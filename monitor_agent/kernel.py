"""Kernel-vector products of the preconditioned eNTK on a fixed probe (DESIGN §4.4).

K̃ = J M Jᵀ / n_p, with J the Jacobian of the probe's (projected) outputs with respect to
the trainable parameters and M the optimizer's diagonal preconditioner. A product K̃v is
one VJP (u = Jᵀ v) and one JVP (J M u) through ``torch.func.functional_call``. The model
is evaluated in eval mode (no dropout, BatchNorm running statistics), under a forked RNG,
and torch.func never touches ``.grad``: the training state is left as it was.

Outputs are projected to R random Rademacher directions (scaled by 1/√R) when there are
many of them, or reduced to the true-class logit. The kernel is defined for the loss
½ mean_i ‖f(x_i) − y_i‖²: for that loss, gradient descent moves the probe residual by
r ← (I − η K̃) r. For cross-entropy the output Hessian is left out and the result is an
approximation (the run meta says so).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextmanager
def probe_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and a forked RNG for the duration; every module's flag is restored."""
    flags = [(m, m.training) for m in model.modules()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    # The fused inference path of nn.TransformerEncoderLayer has no forward-mode AD.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # Fused attention kernels have no forward-mode AD either: use the math kernel.
    with torch.random.fork_rng(devices=devices), sdpa_kernel(SDPBackend.MATH):
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            yield
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
            for m, flag in flags:
                m.train(flag)


def default_memory_limit(device: torch.device) -> int:
    """Bytes the batched kernel products may use at once: half the free memory of a CUDA
    device, 1 GiB elsewhere (host memory is shared with the training process)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(free // 2, 1 << 26)
    return 1 << 30


class ProbeKernel:
    """Matrix-free access to K̃ on a fixed probe of training examples."""

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        projections: int | str = 4,
        loss: str | None = None,
        seed: int = 0,
        memory_limit: int | None = None,
    ) -> None:
        self.model = (
            model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        )
        self.inputs = inputs
        self.targets = targets
        self.loss = loss or ("cross_entropy" if not targets.is_floating_point() else "mse")
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        with torch.no_grad(), probe_mode(self.model):
            out = self.model(inputs)
        self.n_probe = inputs.shape[0]
        # Outputs per example, whatever the model's output layout (some flatten tokens).
        self.n_out = out.numel() // self.n_probe
        gen = torch.Generator().manual_seed(seed)
        self.true_class = projections == "true_class"
        if self.true_class:
            if self.loss != "cross_entropy":
                raise ValueError("projections='true_class' needs class-index targets")
            self.proj: torch.Tensor | None = None
            self.r = 1
        elif isinstance(projections, int) and projections < self.n_out:
            signs = torch.randint(0, 2, (self.n_out, projections), generator=gen) * 2 - 1
            self.proj = (signs / projections**0.5).to(out.dtype).to(out.device)
            self.r = projections
        else:
            self.proj = None
            self.r = self.n_out
        self.size = self.n_probe * self.r
        self.memory_limit = memory_limit or default_memory_limit(inputs.device)
        self.activation_bytes = 0  # what the probe's forward pass saves for backward
        self.example_chunk = self.n_probe  # probe examples per product pass
        self.column_bytes = self._column_bytes()
        self.chunk = max(1, self.memory_limit // self.column_bytes)
        self._held: dict[str, torch.Tensor] | None = None

    def _column_bytes(self) -> int:
        """Memory one vmapped kernel-vector product adds, estimated from one forward pass:
        a parameter-sized cotangent and its preconditioned copy, plus a tangent and a
        cotangent for every activation a pass over ``example_chunk`` probe examples saves.
        The chunk of examples is what keeps twice its activations within a quarter of
        ``memory_limit``: a large probe through a large model is never held at once."""
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        params = {n: p.detach().requires_grad_() for n, p in self._params().items()}
        with probe_mode(self.model), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self._fz(params)
        param_bytes = sum(p.numel() * p.element_size() for p in params.values())
        self.activation_bytes = saved
        fits = (self.memory_limit // 4) * self.n_probe // max(2 * saved, 1)
        self.example_chunk = int(min(self.n_probe, max(1, fits)))
        return max(1, 2 * param_bytes + 2 * saved * self.example_chunk // self.n_probe)

    @property
    def approximate(self) -> bool:
        """True when the kernel leaves out the loss's output Hessian (cross-entropy)."""
        return self.loss != "mse"

    def _params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def _buffers(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_buffers())

    def _project(
        self, out: torch.Tensor, targets: torch.Tensor | None = None, n: int | None = None
    ) -> torch.Tensor:
        """The outputs of n examples (default: the probe) projected to R values each,
        flattened example-major."""
        n = self.n_probe if n is None else n
        targets = self.targets if targets is None else targets
        flat = out.reshape(n, -1)
        if self.true_class:
            return flat.gather(1, targets.reshape(n, 1)).reshape(-1)
        if self.proj is not None:
            flat = flat @ self.proj
        return flat.reshape(-1)

    def _fz(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(self.model, (params, self._buffers()), (self.inputs,))
        return self._project(out)

    def residual(self) -> torch.Tensor:
        """The probe residual in the projected output space: f − y (MSE) or softmax − onehot."""
        with torch.no_grad(), probe_mode(self.model):
            out = self.model(self.inputs).reshape(self.n_probe, -1)
        if self.loss == "mse":
            res = out - self.targets.reshape(self.n_probe, -1).to(out.dtype)
        else:
            onehot = torch.zeros_like(out).scatter_(1, self.targets.reshape(-1, 1), 1.0)
            res = torch.softmax(out, dim=1) - onehot
        return self._project(res)

    def matvec(
        self, v: torch.Tensor, precond: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """K̃ v for one vector v of size n_p·R."""
        return self.matmat(v.reshape(-1, 1), precond).reshape(-1)

    def matmat(
        self, vs: torch.Tensor, precond: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """K̃ V for the columns of V (size n_p·R × c): two matmuls with J while an update
        holds it (``materialized``), else VJP-then-JVP products batched with vmap in
        chunks of columns that fit ``memory_limit``."""
        vs = vs.to(self._dtype())
        if self._held is not None:
            out = torch.zeros(self.size, vs.shape[1], dtype=vs.dtype, device=vs.device)
            for name, jac in self._held.items():
                u = jac.T @ vs
                if precond is not None:
                    u = u * precond[name].reshape(-1, 1)
                out += jac @ u
            return out / self.n_probe
        out = torch.empty(self.size, vs.shape[1], dtype=vs.dtype, device=vs.device)
        with probe_mode(self.model):
            for lo in range(0, vs.shape[1], self.chunk):
                block = vs[:, lo : lo + self.chunk]
                out[:, lo : lo + block.shape[1]] = self._products(block, precond)
        return out

    def _span_outputs(self, lo: int, hi: int) -> Any:
        """The projected outputs of probe examples lo…hi as a function of the parameters."""
        buffers = self._buffers()

        def outputs(ps: dict[str, torch.Tensor]) -> torch.Tensor:
            out = functional_call(self.model, (ps, buffers), (self.inputs[lo:hi],))
            return self._project(out, self.targets[lo:hi], hi - lo)

        return outputs

    def _products(self, vs: torch.Tensor, precond: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """K̃ V for a chunk of columns, in two passes over chunks of probe examples (rows of
        J depend on one example each, eval mode): U = Σ_chunks J_cᵀ V_c by vmapped VJPs,
        then each chunk's rows J_c M U by vmapped JVPs."""
        params = self._params()
        r, step = self.r, self.example_chunk
        spans = [(lo, min(lo + step, self.n_probe)) for lo in range(0, self.n_probe, step)]
        u: dict[str, torch.Tensor] | None = None
        for lo, hi in spans:
            part = self._pull(self._span_outputs(lo, hi), params, vs[lo * r : hi * r])
            u = part if u is None else {n: u[n] + part[n] for n in u}
        assert u is not None
        if precond is not None:
            u = {n: u[n] * precond[n] for n in u}
        out = torch.empty_like(vs)
        for lo, hi in spans:
            rows = self._push(self._span_outputs(lo, hi), params, u)
            out[lo * r : hi * r] = rows / self.n_probe
        return out

    @staticmethod
    def _pull(f: Any, params: dict[str, torch.Tensor], vs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Jᵀ v for every column v of vs (vmapped VJPs), stacked along a first axis."""
        pull = vjp(f, params)[1]
        cols: dict[str, torch.Tensor] = vmap(lambda v: pull(v)[0], in_dims=1)(vs)
        return cols

    @staticmethod
    def _push(f: Any, params: dict[str, torch.Tensor], u: dict[str, torch.Tensor]) -> torch.Tensor:
        """J t for every tangent t stacked in u (vmapped JVPs), as columns."""
        rows: torch.Tensor = vmap(lambda t: jvp(f, (params,), (t,))[1], in_dims=0, out_dims=1)(u)
        return rows

    def explicit(self, precond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The full K̃ (n_p·R square).

        Probe examples are evaluated independently (eval mode), so a row of J depends on
        one example only: per-example Jacobians (``vmap`` over examples of ``jacrev`` of
        the R projected outputs) cost about R batched backward passes over the probe,
        where n_p·R kernel-vector products cost n_p·R forward-and-backward passes over
        all of it. J is built one group of parameters at a time, each group's block of J
        within ``memory_limit``; when a single parameter's block does not fit, K̃ is
        built from kernel-vector products instead."""
        groups = self._jacobian_groups()
        if self._held is None and groups is None:
            eye = torch.eye(self.size, dtype=self._dtype(), device=self.inputs.device)
            k = self.matmat(eye, precond)
        else:
            blocks = [self._held] if self._held is not None else map(self._jacobian, groups or [])
            k = torch.zeros(self.size, self.size, dtype=self._dtype(), device=self.inputs.device)
            itemsize = k.element_size()
            for block in blocks:
                for name, jac in block.items():
                    if precond is None:
                        k.addmm_(jac, jac.T)
                        continue
                    # J M Jᵀ a band of rows at a time: a scaled copy of the whole block
                    # would double the memory the block takes.
                    m = precond[name].reshape(1, -1)
                    rows = max(1, (self.memory_limit // 16) // (jac.shape[1] * itemsize))
                    for lo in range(0, self.size, rows):
                        k[lo : lo + rows].addmm_(jac[lo : lo + rows] * m, jac.T)
            k /= self.n_probe
            k += k.T.clone()
            k /= 2
        return k

    @property
    def holds_jacobian(self) -> bool:
        """True inside ``materialized()`` when J is held whole (products are matmuls)."""
        return self._held is not None

    def blocks_build_explicit(self) -> bool:
        """True when ``explicit()`` would build K̃ from blocks of J (not from products)
        and K̃ itself takes at most a quarter of ``memory_limit``."""
        itemsize = torch.empty((), dtype=self._dtype()).element_size()
        fits = self.size * self.size * itemsize <= self.memory_limit // 4
        return fits and (self._held is not None or self._jacobian_groups() is not None)

    @contextmanager
    def materialized(self) -> Iterator[bool]:
        """Hold the whole J for the duration when it fits ``memory_limit`` (yields whether
        it does): every product of one spectrum update is then two matmuls. The
        parameters must not change inside."""
        groups = self._jacobian_groups()
        if groups is None or len(groups) != 1:
            yield False
            return
        self._held = self._jacobian(groups[0])
        try:
            yield True
        finally:
            self._held = None

    def _jacobian_groups(self) -> list[list[str]] | None:
        """Parameter names grouped so that each group's block of J (n_p·R × its size,
        plus one chunk of per-example Jacobians) fits ``memory_limit``; None if one
        parameter alone does not."""
        itemsize = torch.empty((), dtype=self._dtype()).element_size()
        per_coord = self.size * itemsize
        # Three quarters of the limit for the block and K̃ (built beside it); the last
        # quarter for the per-example Jacobians being computed.
        room = 3 * self.memory_limit // 4 - self.size * self.size * itemsize
        budget = max(room, 0) // per_coord  # coordinates per group
        groups: list[list[str]] = []
        used = budget
        for name, p in self._params().items():
            if p.numel() > budget:
                return None
            if used + p.numel() > budget:
                groups.append([])
                used = 0
            groups[-1].append(name)
            used += p.numel()
        return groups

    def _jacobian(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Rows of J (n_p·R × size, in the order of the projected outputs) for the
        named parameters, from per-example Jacobians in chunks of examples."""
        params = self._params()
        wanted = {n: params[n] for n in names}
        fixed = {n: p for n, p in params.items() if n not in wanted}
        buffers = self._buffers()

        def outputs(ps: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = functional_call(self.model, ({**fixed, **ps}, buffers), (x.unsqueeze(0),))
            return self._project(out, t, 1)

        per_example = vmap(jacrev(outputs), in_dims=(None, 0, 0))
        coords = sum(p.numel() for p in wanted.values())
        itemsize = torch.empty((), dtype=self._dtype()).element_size()
        # A chunk of examples within a quarter of the limit: per example, R rows of J
        # and jacrev's working copy of them, and R backward passes' worth of activations.
        example_bytes = 2 * self.r * (coords * itemsize + self.activation_bytes // self.n_probe)
        chunk = max(1, (self.memory_limit // 4) // example_bytes)
        device = self.inputs.device
        out = {
            n: torch.empty(self.size, p.numel(), dtype=self._dtype(), device=device)
            for n, p in wanted.items()
        }
        with probe_mode(self.model):
            for lo in range(0, self.n_probe, chunk):
                jac = per_example(
                    wanted, self.inputs[lo : lo + chunk], self.targets[lo : lo + chunk]
                )
                rows = slice(lo * self.r, (lo + jac[names[0]].shape[0]) * self.r)
                for n in names:
                    out[n][rows] = jac[n].reshape(-1, out[n].shape[1])
        return out

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def describe(self) -> dict[str, Any]:
        """Settings for the run meta."""
        return {
            "probe_size": self.n_probe,
            "outputs": self.n_out,
            "projections": "true_class" if self.true_class else self.r,
            "loss": self.loss,
            "approximation": self.approximate,
            "kernel": "J M J^T / n_p of the projected outputs, M = optimizer preconditioner",
        }
