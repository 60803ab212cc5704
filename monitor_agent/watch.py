"""`Run.watch`: per-layer signal/noise statistics read in an optimizer step pre-hook.

Per step (after backward, before the optimizer changes anything) the monitor gathers the
sampled coordinates of every watched gradient into one flat vector and updates the
streaming noise estimate in a few fused kernels. On emitted steps it computes every
statistic of DESIGN §4.3 on the device and moves them to the host in one transfer.

Estimators (``signal/estimator``): 0 streaming, 1 micro-batch, 2 per-example.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from monitor_agent import cpu_kernels as fused_kernels
from monitor_agent import signal_stats as st
from monitor_agent.kernel import ProbeKernel
from monitor_agent.memorization import (
    MemorizationTracker,
    OnsetSettings,
    TailStatistics,
    probe_losses,
)
from monitor_agent.microbatch import BackwardCounter, MicroBatchCapture, sampled_flat
from monitor_agent.per_example import PerExampleCapture
from monitor_agent.spectrum import GramianTracker, SpectrumReport, SpectrumSchedule, collect_probe

NOISE_MODES = ("auto", "streaming", "microbatch", "per_example")
MAX_EMIT_SCALE = 8
STREAMING, MICROBATCH, PER_EXAMPLE = 0, 1, 2


@dataclass
class ExactNoise:
    """One step's exact noise: ŝ per sampled coordinate, the estimator, which layers it
    covers (the rest carry the streaming ŝ), and the degrees of freedom of the gate's
    null (b − 1 examples or K − 1 micro-batches or ranks)."""

    s: torch.Tensor
    estimator: int
    layers: list[bool]
    dof: int


def _select(
    model: nn.Module, include: Iterable[str] | None, exclude: Iterable[str] | None
) -> list[tuple[str, nn.Parameter]]:
    inc, exc = list(include or []), list(exclude or [])
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if inc and not any(name.startswith(x) for x in inc):
            continue
        if any(name.startswith(x) for x in exc):
            continue
        out.append((name, p))
    return out


def _coordinate_sample(
    shape: torch.Size, fraction: float, min_coords: int, rng: random.Random
) -> slice | None:
    """A fixed systematic sample of a tensor's flattened coordinates: a random start and
    a stride coprime to the row length, so every column and (for long tensors) every row
    is visited. A slice keeps the per-step gather a strided view instead of a random
    gather kernel. None means every coordinate."""
    n = math.prod(shape)
    m = n if fraction >= 1 else min(n, max(min_coords, math.ceil(fraction * n)))
    if m >= n:
        return None
    stride = n // m
    row = shape[-1] if len(shape) > 1 else 1
    # Stepping the stride down keeps at least m coordinates.
    while stride > 1 and math.gcd(stride, row) != 1:
        stride -= 1
    if stride <= 1:
        return None
    return slice(rng.randrange(stride), n, stride)


def _sample_size(n: int, sl: slice | None) -> int:
    """Coordinates a tensor of n coordinates contributes under its sample."""
    return n if sl is None else len(range(n)[sl])


def _model_sample(
    shapes: list[torch.Size], fraction: float, min_coords: int, dtype: torch.dtype, seed: int
) -> list[slice | None]:
    """Each tensor's coordinate sample, thinned so that a sampled model's state fits in one
    parameter-sized buffer of the parameters' dtype.

    A sample needs its own first moment (Adam's exp_avg serves only full coverage), so it
    costs two floats and a byte per sampled coordinate: on a model of many tensors near
    ``min_coords`` (a small CNN) the per-tensor floor alone would cover most coordinates
    and cost ~1.5 buffers. Full coverage (``fraction=1``, or every tensor under the floor)
    is kept as it is."""
    if fraction >= 1:
        return [None] * len(shapes)
    total = sum(math.prod(s) for s in shapes)
    width = torch.finfo(dtype).bits // 8
    cap = total * width // (2 * width + 1)
    scale = 1.0
    while True:
        rng = random.Random(seed)
        floor = max(1, int(min_coords * scale))
        idx = [_coordinate_sample(s, fraction * scale, floor, rng) for s in shapes]
        sampled = sum(_sample_size(math.prod(s), sl) for s, sl in zip(shapes, idx, strict=True))
        if sampled <= cap or floor == 1 or (scale == 1 and sampled == total):
            return idx  # every tensor under the floor: full coverage, Adam's exp_avg serves
        scale *= 0.9 * cap / sampled


def _is_distributed(model: nn.Module) -> bool:
    """True for a DistributedDataParallel model in a process group of several ranks."""
    import torch.distributed as dist

    return (
        isinstance(model, nn.parallel.DistributedDataParallel)
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() >= 2
    )


class Monitor:
    """Gradient statistics of one model/optimizer pair, attached by ``Run.watch``."""

    def __init__(
        self,
        run: Any,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        batch_size: int,
        dataset_size: int | None = None,
        noise: str = "auto",
        emit_every: int = 10,
        sample_fraction: float = 0.01,
        min_coords: int = 10_000,
        budget: float | None = 0.03,
        per_example_every: int = 1,
        hist_every: int | None = None,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        rho: float = 0.99,
        beta: float = 0.9,
        reservoir_steps: int = 100,
        soft_lambda: float = 1.0,
        seed: int = 0,
        keep_snapshot: bool = False,
        grad_scaler: Any = None,
        probe: Any = None,
        spectrum_every: int | str = "auto",
        k: int = 16,
        projections: int | str = 4,
        probe_size: int = 256,
        probe_loss: str | None = None,
        exact_max: int = 4096,
        sketch_size: int | None = None,
        spectrum_memory: int | None = None,
        memorization: OnsetSettings | dict[str, Any] | None = None,
        hook: str = "optimizer",
        cpu_kernels: bool = False,
    ) -> None:
        if noise not in NOISE_MODES:
            raise ValueError(f"noise={noise!r}: expected one of {NOISE_MODES}")
        if batch_size < 2:
            raise ValueError("batch_size must be at least 2 for a noise estimate")
        if not 0 < sample_fraction <= 1:
            raise ValueError("sample_fraction must be in (0, 1]")
        if emit_every < 1:
            raise ValueError("emit_every must be >= 1")
        asked_noise = noise
        if (
            noise == "auto"
            and dataset_size is not None
            and batch_size >= dataset_size
            and not _is_distributed(model)
        ):
            # The batch is the whole training set: exact per-example noise makes the
            # leave-one-out gate the training-set gate of §4.5 and gives the signal score,
            # where the streaming estimate of a full batch measures drift and leaves the
            # tail score, which does not see grokking (experiments/GROKKING_CLEAR.md: 6/8
            # fresh grokking seeds meet the target with it, 2/8 with the streaming default).
            noise = "per_example"
        self.run = run
        self.model = model
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.dataset_size = dataset_size
        # The published fields (population_fraction only with a dataset size), made once:
        # (index in signal_stats.LAYER_FIELDS, name, the overall value's scalar name).
        self._fields = [
            (i, name, f"signal/{name}")
            for i, name in enumerate(st.LAYER_FIELDS)
            if not (name == "population_fraction" and dataset_size is None)
        ]
        self.noise = noise
        self.emit_every = emit_every
        self.emit_interval = emit_every  # what the budget has made of emit_every
        self.hist_every = hist_every or 10 * emit_every
        self.budget = budget
        self.per_example_every = per_example_every
        self.rho, self.beta = rho, beta
        self.keep_snapshot = keep_snapshot
        self.grad_scaler = grad_scaler
        self.snapshot: dict[str, Any] = {}
        if dataset_size is None:
            warnings.warn(
                "channelscope: watch() without dataset_size reports no population-signal "
                "fraction and no memorization score",
                stacklevel=3,
            )
        self.gate = st.GateSettings(
            alpha=1.0,
            soft_lambda=soft_lambda,
            alpha_n=st.training_set_alpha(batch_size, dataset_size),
            reservoir_evals=min(254, max(1, math.ceil(reservoir_steps / emit_every))),
        )

        named = _select(model, include, exclude)
        if not named:
            raise ValueError("watch(): no trainable parameters selected")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        device = self.params[0].device
        # Opt-in (numba and LLVM add ~100–140 MiB resident): the per-step update and the
        # emitted-step statistics as fused CPU kernels, loaded in the background; the torch
        # path serves until they are ready.
        self.cpu_kernels = cpu_kernels and device.type == "cpu"
        if self.cpu_kernels:
            fused_kernels.load()
        self.dtype = torch.float64 if self.params[0].dtype == torch.float64 else torch.float32
        self.idx = _model_sample(
            [p.shape for p in self.params], sample_fraction, min_coords, self.dtype, seed
        )
        self.bounds: list[tuple[int, int]] = []
        offset = 0
        for p, sl in zip(self.params, self.idx, strict=True):
            m = _sample_size(p.numel(), sl)
            self.bounds.append((offset, offset + m))
            offset += m
        self.n_coords = offset
        self.full_coverage = all(sl is None for sl in self.idx)
        zeros = torch.zeros(self.n_coords, dtype=self.dtype, device=device)
        self.s = zeros.clone()
        # The agent's own first moment exists only when Adam's exp_avg cannot serve
        # (another optimizer, or a coordinate sample): with Adam and full coverage the
        # agent's state is one float buffer (s) and one byte per coordinate.
        self._own_m: torch.Tensor | None = None
        self.closed_run = torch.zeros(self.n_coords, dtype=torch.uint8, device=device)
        # Scratch kept between steps stays within one parameter-sized buffer, so the agent's
        # memory grows with the model as its state does; a model whose sample is large next
        # to its parameters (a small CNN) keeps only part of it and makes the rest per use.
        param_bytes = sum(p.numel() for p in self.params) * (torch.finfo(self.dtype).bits // 8)
        self.workspace = st.Workspace(
            self.n_coords, self.dtype, device, limit=min(st.WORKSPACE_LIMIT, param_bytes)
        )
        self.nonfinite = torch.zeros((), dtype=self.dtype, device=device)
        self.n_updates = 0
        # With exact per-example noise the streaming estimate is only the fallback for
        # layers the capture cannot handle and the source of m̂: updating it on emitted
        # steps is enough, and keeps the exact mode's cost at its own cadence.
        self.stride = emit_every if noise == "per_example" else 1
        self.step = 0
        self._reported_nonfinite = 0.0
        self._agent_s = 0.0
        self._sender_cpu = 0.0
        self._cost_sum = self._wall_sum = 0.0  # decaying sums behind the budget's ratio
        self._window_start = time.perf_counter()
        self._last_estimator = STREAMING
        self._w: torch.Tensor | None = None
        self._w_kind = False
        self._adam_cache: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None
        self._plan: Any = None  # the fused kernels' plan (cpu_statistics.Plan), once loaded
        self._exact: ExactNoise | None = None

        self.per_example: PerExampleCapture | None = None
        if noise == "per_example":
            self.per_example = PerExampleCapture(model, self.params)
            self.per_example.active = True
        self.microbatch: MicroBatchCapture | None = None
        self.counter: BackwardCounter | None = None
        self.ranks: Any = None
        if noise in ("auto", "microbatch") and _is_distributed(model):
            from monitor_agent.ranks import RankCapture

            self.ranks = RankCapture(model, self.params, self.idx, self.dtype)  # type: ignore[arg-type]
        elif noise == "microbatch":
            self.microbatch = MicroBatchCapture(self.params, self.idx, self.dtype)
        elif noise == "auto":
            self.counter = BackwardCounter(self.params[0])
        self.kernel: ProbeKernel | None = None
        self.gramian: GramianTracker | None = None
        self.schedule: SpectrumSchedule | None = None
        self._lrs: list[float] = []
        self._spectrum_s = 0.0
        if probe is not None:
            inputs, targets = collect_probe(probe, probe_size)
            self.kernel = ProbeKernel(
                model, inputs.to(device), targets.to(device),
                projections=projections, loss=probe_loss, seed=seed,
                memory_limit=spectrum_memory,
            )  # fmt: skip
            self.gramian = GramianTracker(
                self.kernel, k, exact_max=exact_max, sketch_size=sketch_size, seed=seed
            )
            self.schedule = SpectrumSchedule(spectrum_every, budget or 0.03)
        self._probe: tuple[torch.Tensor, torch.Tensor, str] | None = None
        if self.kernel is not None:
            self._probe = (self.kernel.inputs, self.kernel.targets, self.kernel.loss)
        onset = (
            memorization
            if isinstance(memorization, OnsetSettings)
            else OnsetSettings(**(memorization or {}))
        )
        chance = None
        if self.kernel is not None and self.kernel.loss == "cross_entropy":
            chance = math.log(self.kernel.n_out)
        onset = replace(
            onset, score=self._score_kind(onset.score, noise, chance, batch_size, dataset_size)
        )
        onset = replace(onset, reference=onset.resolved_reference())
        self.tracker: MemorizationTracker | None = None
        if dataset_size is not None:
            # Full batch (n ≤ b) has no training-set floor (α_n = 0, gradient score 0),
            # but a finite set can still be memorized: the tail score stays enabled.
            self.tracker = MemorizationTracker(self.gate.alpha_n, chance, onset)
        self._last_emit_step = 0
        # Last emitted step of each slower schedule (histograms, probe); the first emitted
        # step runs them all.
        self._last_run: dict[str, int] = {}
        self._probe_window = 0
        if hook not in ("optimizer", "manual"):
            raise ValueError("hook must be 'optimizer' or 'manual'")
        # 'manual': a framework callback (Lightning on_before_optimizer_step, Hugging Face
        # on_pre_optimizer_step) calls observe_step() at the same point of the step.
        self._handle = (
            optimizer.register_step_pre_hook(self._pre_step) if hook == "optimizer" else None
        )
        run.update_meta(
            {
                "layers": self.names,
                "settings": {
                    "noise": noise,
                    "noise_asked": asked_noise,
                    "batch_size": batch_size,
                    "dataset_size": dataset_size,
                    "emit_every": emit_every,
                    "sample_fraction": sample_fraction,
                    "min_coords": min_coords,
                    "coords": self.n_coords,
                    "rho": rho,
                    "beta": beta,
                    "budget": budget,
                    "cpu_kernels": self.cpu_kernels,
                    "gate": asdict(self.gate),
                    "optimizer": type(optimizer).__name__,
                    "spectrum": None
                    if self.kernel is None
                    else {
                        **self.kernel.describe(),
                        "k": k,
                        "every": spectrum_every,
                        "path": "exact" if self.gramian and self.gramian.exact else "sketch",
                    },
                    "memorization": asdict(onset) if self.tracker is not None else None,
                    "per_example_unsupported": sorted(
                        n
                        for n, p in named
                        if self.per_example is not None and p in self.per_example.unsupported
                    ),
                },
            }
        )

    def _score_kind(
        self,
        asked: str,
        noise: str,
        chance: float | None,
        batch_size: int,
        dataset_size: int | None,
    ) -> str:
        """The memorization score the onset rule will use (``OnsetSettings.score``)."""
        exact = noise in ("per_example", "microbatch") or self.ranks is not None
        if asked in ("signal", "signal_or_tail") and not exact:
            raise ValueError(
                f"memorization score {asked!r} needs an exact noise estimator: "
                "noise='per_example' or 'microbatch', or DDP ranks"
            )
        if asked == "auto":
            # Only a batch that is the whole training set makes the exact gate the
            # training-set gate of §4.5 (leave one training example out); on mini-batches
            # it measures batch noise, which says nothing about memorizing the set.
            full_batch = dataset_size is not None and batch_size >= dataset_size
            asked = "signal" if exact and full_batch else "tail"
        # Without a classification probe there is no chance level to disagree with.
        if asked == "tail" and chance is None:
            return "gradient"
        if asked == "signal_or_tail" and chance is None:
            return "signal"
        return asked

    # ----- lifecycle ------------------------------------------------------------------
    def detach(self) -> None:
        """Remove every hook this monitor installed."""
        if self._handle is not None:
            self._handle.remove()
        for cap in (self.per_example, self.microbatch, self.counter):
            if cap is not None:
                cap.remove()

    # ----- per-step work --------------------------------------------------------------
    def _flat(
        self, tensors: list[torch.Tensor | None], name: str
    ) -> tuple[torch.Tensor, float | None]:
        """The sampled coordinates of ``tensors`` as one flat vector, written into the
        workspace tensor ``name`` (valid until the next step), and their sum where the
        fused gather took them (None otherwise)."""
        out = self.workspace.get(name)
        plan = self._fused_plan()
        total = None if plan is None else plan.gather(tensors, out, name)
        if total is not None:
            return out, total
        pieces = []
        for t, idx, (lo, hi) in zip(tensors, self.idx, self.bounds, strict=True):
            if t is None:
                pieces.append(torch.zeros(hi - lo, dtype=self.dtype, device=self.s.device))
            else:
                pieces.append(sampled_flat(t.detach(), idx, self.dtype))
        return torch.cat(pieces, out=out), None

    def _adam_state(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        """Per-parameter optimizer state and group when every watched parameter has
        Adam-style moments (exp_avg, exp_avg_sq); else None. Cached once complete: the
        optimizer keeps the same state dicts for the life of a parameter."""
        if self._adam_cache is not None:
            return self._adam_cache
        states, groups = [], []
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        for p in self.params:
            state = self.optimizer.state.get(p, {})
            if "exp_avg" not in state or "exp_avg_sq" not in state:
                return None
            states.append(state)
            groups.append(group_of[id(p)])
        self._adam_cache = (states, groups)
        return self._adam_cache

    @property
    def m(self) -> torch.Tensor:
        """The agent's own first-moment EMA of the sampled gradient (allocated on use)."""
        if self._own_m is None:
            self._own_m = torch.zeros_like(self.s)
        return self._own_m

    def state_bytes(self) -> int:
        """Bytes of per-coordinate state the agent keeps between steps."""
        own = self._own_m.numel() * self._own_m.element_size() if self._own_m is not None else 0
        return self.s.numel() * self.s.element_size() + own + self.closed_run.numel()

    def _first_moment(self, adam: Any) -> tuple[torch.Tensor, float, float]:
        """m_{t−1} before this step, the β of its EMA, and how many steps it has seen.

        With full coverage Adam's exp_avg is reused (no parameter-sized buffer of our
        own); on a coordinate sample our own EMA of the sample is cheaper than gathering
        exp_avg every step, and its memory is the sample's size."""
        if self._owns_m(adam):
            return self.m, self.beta, float(self.n_updates)
        states, groups = adam
        seen = float(states[0].get("step", 0))
        exp_avg, _ = self._flat([s["exp_avg"] for s in states], "exp_avg")
        return exp_avg, float(groups[0]["betas"][0]), seen

    def _step_scale(self, adam: Any) -> torch.Tensor:
        """w: learning rate over the optimizer's per-coordinate denominator."""
        if adam is None:
            lr = float(self.optimizer.param_groups[0].get("lr", 1.0))
            return torch.full((self.n_coords,), lr, dtype=self.dtype, device=self.s.device)
        pieces = []
        for state, (lr, correction, eps), idx in zip(
            adam[0], self._adam_constants(adam), self.idx, strict=True
        ):
            v = sampled_flat(state["exp_avg_sq"], idx, self.dtype) / correction
            pieces.append(lr / (v.sqrt() + eps))
        return torch.cat(pieces)

    def _adam_constants(self, adam: Any) -> list[tuple[float, float, float]]:
        """(lr, 1 − β₂ᵗ, ε) per watched parameter: w = lr / (√(v / (1 − β₂ᵗ)) + ε)."""
        out = []
        for state, group in zip(*adam, strict=True):
            step = float(state["step"]) if "step" in state else 1.0
            beta2 = float(group["betas"][1])
            out.append((float(group["lr"]), 1 - beta2 ** max(step, 1.0), float(group["eps"])))
        return out

    def _unscale_squares(self) -> torch.Tensor | float:
        """1/scale²: hooks saw gradients of the scaled loss, p.grad is unscaled by now."""
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return 1.0
        scale = self.grad_scaler._get_scale_async()
        if scale is None:
            return 1.0
        inv: torch.Tensor = 1.0 / (scale.to(self.dtype) ** 2)
        return inv

    def _exact_noise(self, g: torch.Tensor, s_stream: torch.Tensor) -> ExactNoise | None:
        """ŝ = Σ/(b−1) from an exact estimator this step; None if none ran."""
        every_layer = [True] * len(self.params)
        if self.ranks is not None and self.ranks.ready():
            pieces = [
                self.ranks.noise(p, g[lo:hi])
                for p, (lo, hi) in zip(self.params, self.bounds, strict=True)
            ]
            return ExactNoise(torch.cat(pieces), MICROBATCH, every_layer, self.ranks.world - 1)
        unscale = self._unscale_squares()
        k = self.microbatch.micro_batches() if self.microbatch is not None else 0
        if self.microbatch is not None and k >= 2:
            pieces = [
                self.microbatch.noise(p, g[lo:hi], unscale)
                for p, (lo, hi) in zip(self.params, self.bounds, strict=True)
            ]
            return ExactNoise(torch.cat(pieces), MICROBATCH, every_layer, k - 1)
        cap = self.per_example
        if cap is not None and cap.sumsq:
            pieces, exact, counts = [], [], []
            for p, idx, (lo, hi) in zip(self.params, self.idx, self.bounds, strict=True):
                ok = p in cap.sumsq and p not in cap.unsupported and cap.examples.get(p, 0) >= 2
                exact.append(ok)
                if ok:
                    b = cap.examples[p]
                    counts.append(b)
                    s2 = sampled_flat(cap.sumsq[p], idx, self.dtype) * unscale
                    gk = g[lo:hi]
                    sigma = (b * s2 - gk * gk).clamp_min(0)
                    pieces.append(sigma / (b - 1))
                else:
                    pieces.append(s_stream[lo:hi])
            return ExactNoise(torch.cat(pieces), PER_EXAMPLE, exact, min(counts, default=1) - 1)
        return None

    def observe_step(self) -> None:
        """Read this step's gradients (call after backward, before the optimizer step)."""
        self._pre_step(self.optimizer, (), {})

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        t0 = time.perf_counter()
        try:
            self._observe()
        finally:
            self._agent_s += time.perf_counter() - t0

    def _observe(self) -> None:
        step = self.step
        self.step += 1
        if self.counter is not None and self.counter.count >= 2 and self.microbatch is None:
            # Gradient accumulation seen: from the next step on, measure it exactly.
            self.microbatch = MicroBatchCapture(self.params, self.idx, self.dtype)
        if self.counter is not None:
            self.counter.count = 0
        if self.schedule is not None:
            # The parameters now reflect the updates of steps 0 … step−1, whose learning
            # rates are in the window; this step's rate joins the next window.
            if self.schedule.due(step):
                self._update_spectrum(step)
            self._lrs.append(float(self.optimizer.param_groups[0].get("lr", 0.0)))
        emit = step % self.emit_interval == 0
        update = step % self.stride == 0
        if not (emit or update):
            self._reset_captures(step)
            return
        # Every per-step vector lives in the workspace: fresh ones come from (and return to)
        # the heap the training step allocates from, which changes how often the step's own
        # tensors fault (bench/results/single_model.md, equal cadence on the 1024-wide MLP:
        # 2,111 faults a step with them made anew, 1,736 kept).
        work = self.workspace
        adam = self._adam_state()
        m_prev, beta, seen = self._first_moment(adam)
        total = None
        if emit:
            g = work.get("g")
            total = self._emit_in_one_pass(step, g, m_prev, beta, seen, adam, update)
            if total is not None and math.isfinite(total):
                self.n_updates += int(update)
                self._reset_captures(step)
                return
        if total is None:  # else the kernel gathered g, and found a non-finite value
            g, total = self._flat([p.grad for p in self.params], "g")
        # One reduction: a NaN or Inf anywhere makes the sum non-finite.
        ok: torch.Tensor | float
        if g.device.type == "cpu":
            # Reading a CPU value costs no device sync: a finite step (nearly all of
            # them) then skips the kernels that mask a non-finite one.
            ok = 1.0 if math.isfinite(float(g.sum()) if total is None else total) else 0.0
        else:
            ok = torch.isfinite(g.sum()).to(self.dtype)
        finite = isinstance(ok, float) and ok == 1.0  # known finite without a device sync
        if not finite:
            self.nonfinite.add_(1 - ok)
            g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # g is our own copy
        if emit:
            # m̂ including this step, bias-corrected, for the gate and the population gate;
            # taken before the update, which may overwrite m_prev (the agent's own EMA).
            m_hat = torch.lerp(m_prev, g, 1 - beta, out=work.get("m_hat"))
            m_hat.mul_(1 / (1 - beta ** (seen + 1)))
        if update:
            # s ← (1−w)s + w(g − m_{t−1})², with w = 0 on a non-finite step.
            own_m = self._owns_m(adam)
            plan = self._fused_plan() if finite else None
            fused = plan is not None and plan.update_moments(
                g, m_prev, self.s, own_m, 1 - self.rho, 1 - beta
            )
            if not fused:
                d = torch.sub(g, m_prev, out=work.get("d"))
                self.s.lerp_(d.mul_(d), (1 - self.rho) * ok)
                if own_m:
                    self.m.lerp_(g, (1 - beta) * ok)
            self.n_updates += 1
        if emit:
            self._emit(step, g, m_hat, beta, adam)
        self._reset_captures(step)

    def _preconditioner(self) -> dict[str, torch.Tensor] | None:
        """M as full tensors by parameter name: 1/(√v̂+ε) for Adam-style optimizers, None
        (the identity) for others."""
        adam = self._adam_state()
        if adam is None or self.kernel is None:
            return None
        by_param = {}
        for p, state, group in zip(self.params, adam[0], adam[1], strict=True):
            step = max(float(state.get("step", 1)), 1.0)
            v_hat = state["exp_avg_sq"] / (1 - float(group["betas"][1]) ** step)
            by_param[id(p)] = 1.0 / (v_hat.sqrt() + float(group["eps"]))
        out = {}
        for name, p in self.kernel.model.named_parameters():
            if p.requires_grad:
                out[name] = by_param.get(id(p), torch.ones_like(p))
        return out

    def _update_spectrum(self, step: int) -> None:
        assert self.gramian is not None and self.schedule is not None
        t0 = time.perf_counter()
        reports: list[SpectrumReport] = []
        self._capture_off(
            lambda: reports.append(self.gramian.update(self._lrs, self._preconditioner()))
        )
        report = reports[0]
        self._lrs = []
        cost = time.perf_counter() - t0
        self._spectrum_s += cost
        amortized = self.schedule.done(step, cost)
        now = time.time()
        self.run.emit(
            "spectrum",
            {
                "step": step,
                "t": now,
                "w_eigs": report.w_eigs,
                "kernel_eigs": report.kernel_eigs,
                "method": report.method,
                "probe_size": report.probe_size,
            },
        )
        scalars = {f"spectrum/{k}": v for k, v in report.scalars.items()}
        scalars["spectrum/cost_s"] = cost
        scalars["agent/spectrum_overhead"] = amortized
        self.run.emit("scalars", {"step": step, "t": now, "s": scalars})

    def _reset_captures(self, step: int) -> None:
        if self.ranks is not None:
            self.ranks.reset()
        if self.microbatch is not None:
            self.microbatch.reset()
        if self.per_example is not None:
            self.per_example.reset()
            # Exact statistics are only read on emitted steps: capture only before those.
            nxt = step + 1
            self.per_example.active = (
                nxt % self.per_example_every == 0 and nxt % self.emit_interval == 0
            )

    def streaming_noise(self, beta: float) -> torch.Tensor:
        """ŝ from the streaming estimator: the EMA of (g_t − m_{t−1})², bias-corrected
        for its start, times (1+β)/2 because m_{t−1} carries noise of its own:
        E[(g − m)²] = σ²/b · 2/(1+β) for a stationary gradient. A workspace tensor: valid
        until the next step."""
        scale = self._noise_scale(beta, self.n_updates)
        return torch.mul(self.s, scale, out=self.workspace.get("s_stream"))

    def _noise_scale(self, beta: float, n_updates: int) -> float:
        """ŝ/s after ``n_updates`` updates: the start's bias correction times (1+β)/2."""
        return (1 + beta) / 2 / (1 - self.rho ** max(n_updates, 1))

    def _warm(self, n_updates: int) -> bool:
        """Whether the streaming estimate has seen enough steps (1/(1−ρ)) to be published."""
        return n_updates * self.stride >= 1 / (1 - self.rho)

    def _owns_m(self, adam: Any) -> bool:
        """Whether the first moment is the agent's own EMA (another optimizer, or a
        coordinate sample) rather than Adam's exp_avg."""
        return adam is None or not self.full_coverage

    def _emit(
        self, step: int, g: torch.Tensor, m_hat: torch.Tensor, beta: float, adam: Any
    ) -> None:
        s_stream = self.streaming_noise(beta)
        exact = self._exact_noise(g, s_stream)
        self._exact = exact
        if exact is not None:
            s, estimator = exact.s, exact.estimator
            m2 = torch.mul(g, g, out=self.workspace.get("m2"))
        else:
            s, estimator = s_stream, STREAMING
            m2 = torch.mul(m_hat, m_hat, out=self.workspace.get("m2"))
        self._last_estimator = estimator
        warm = estimator != STREAMING or self._warm(self.n_updates)
        with_hist = self._due("hist", step, self.hist_every) is not None
        # v̂ is a slow EMA (β2 ≈ 0.999): refreshing w with the histograms is enough.
        if with_hist or self._w_stale(adam):
            self._w = self._step_scale(adam)
            self._w_kind = adam is not None
        w = self._w
        assert w is not None  # measured just above when missing
        m2_pop = m2 if exact is None else torch.mul(m_hat, m_hat, out=self.workspace.get("m2_pop"))
        per_layer, overall, rates = st.layer_statistics(
            g, s, m2, w, m2_pop, self.closed_run, self.bounds, self.batch_size, self.gate,
            self.workspace, fused=None if self.cpu_kernels else False, plan=self._fused_plan(),
        )  # fmt: skip
        parts: dict[str, torch.Tensor] = {
            "overall": overall,
            "per_layer": per_layer.reshape(-1),
            "nonfinite": self.nonfinite.reshape(1),
            "tq": rates,  # T = Σ w m̂² and Q = Σ w (m̂² − α_n ŝ): the rates of §4.5
        }
        if with_hist:
            parts["hist"] = st.log_snr_histograms(g, s, self.bounds).reshape(-1)
        probe_window = (
            self._due("probe", step, self.tracker.settings.probe_every)
            if self.tracker is not None and self._probe is not None
            else None
        )
        if probe_window is not None:
            self._probe_window = probe_window
            assert self._probe is not None
            inputs, targets, loss = self._probe
            self._capture_off(
                lambda: parts.__setitem__("tail", self._tail_tensor(inputs, targets, loss))
            )
        if self.keep_snapshot:
            self.snapshot = {"g": g.clone(), "s": s.clone(), "m2": m2.clone(), "w": w.clone()}
        names = list(parts)
        sizes = [parts[n].numel() for n in names]
        flat = torch.cat([parts[n] for n in names]).tolist()  # the one transfer
        host: dict[str, list[float]] = {}
        offset = 0
        for n, size in zip(names, sizes, strict=True):
            host[n] = flat[offset : offset + size]
            offset += size
        self._publish(step, host, estimator, warm)

    def _emit_in_one_pass(
        self, step: int, g: torch.Tensor, m_prev: torch.Tensor, beta: float, seen: float,
        adam: Any, update: bool,
    ) -> float | None:  # fmt: skip
        """An emitted step of the streaming estimator in one fused CPU kernel: the gather,
        the update (when ``update``), w and the histograms when due, and every statistic,
        then publish. Returns the gathered gradient's sum: finite when the step is done;
        non-finite when only the gradient was gathered (into ``g``), for the caller to
        mask. None, with nothing done, where the kernels do not serve it: not
        loaded, another estimator, the probe due (it needs the model), a snapshot kept, w
        not yet measured, or tensors the kernel does not take."""
        if (
            not self.cpu_kernels
            or self.keep_snapshot
            or self.per_example is not None
            or self.microbatch is not None
            or self.ranks is not None
            or self._w_stale(adam)  # never measured, or for another optimizer
            or (
                self.tracker is not None
                and self._probe is not None
                and self._is_due("probe", step, self.tracker.settings.probe_every)
            )
        ):
            return None
        plan = self._fused_plan()
        if plan is None:
            return None
        with_hist = self._is_due("hist", step, self.hist_every)
        step_scale = None
        if with_hist:
            # w is refreshed with the histograms, as on the torch path: Adam's in the kernel.
            if adam is None:
                self._w = self._step_scale(None)
            else:
                step_scale = ([s["exp_avg_sq"] for s in adam[0]], self._adam_constants(adam))
        n_after = self.n_updates + int(update)
        weights = (
            (1 - self.rho) if update else 0.0,  # w_s
            1 - beta,  # w_m
            1 - beta,  # m̂'s lerp
            1 / (1 - beta ** (seen + 1)),  # m̂'s bias correction
            self._noise_scale(beta, n_after),  # ŝ/s
        )
        total: float | None = plan.run(
            (g, m_prev, self.s, self._w, m_prev), self.closed_run,
            stream=weights, own_m=update and self._owns_m(adam),
            sources=[p.grad for p in self.params], step_scale=step_scale, hist=with_hist,
        )  # fmt: skip
        if total is None or not math.isfinite(total):
            return total
        if with_hist:
            self._due("hist", step, self.hist_every)
        self._exact, self._last_estimator = None, STREAMING
        overall, per_layer, rates = st.split_fields(plan.out.tolist(), len(self.bounds))
        host = {
            "overall": overall,
            "per_layer": per_layer,
            "nonfinite": [float(self.nonfinite)],
            "tq": rates,
        }
        if with_hist:
            host["hist"] = plan.hist.ravel().tolist()
        self._publish(step, host, STREAMING, self._warm(n_after))
        return total

    def _fused_plan(self) -> Any:
        """The fused kernels' plan for this monitor's layout, made once they have loaded;
        None without them (not asked for, not loaded yet, or not available)."""
        if self._plan is None and self.cpu_kernels and fused_kernels.loaded() is not None:
            self._plan = st.fused_plan(
                self.n_coords, self.bounds, self.batch_size, self.gate, self.dtype, self.idx
            )
        return self._plan

    def _due(self, schedule: str, step: int, every: int) -> int | None:
        """Steps since ``schedule`` last ran if it is due at this emitted step, else None.

        Due on the first emitted step of each interval rather than on multiples of
        ``every``: the budget may space emissions so that few fall on those multiples."""
        if not self._is_due(schedule, step, every):
            return None
        last = self._last_run.get(schedule)
        self._last_run[schedule] = step
        return step - last if last is not None else every

    def _w_stale(self, adam: Any) -> bool:
        """Whether w must be measured (again): never measured, or the optimizer's kind of
        step scale (Adam's or a plain learning rate) is not the one it was measured for."""
        return self._w is None or self._w_kind != (adam is not None)

    def _is_due(self, schedule: str, step: int, every: int) -> bool:
        """Whether ``schedule`` is due at this emitted step (nothing is marked as run)."""
        last = self._last_run.get(schedule)
        return last is None or step - last >= every

    def _tail_tensor(self, inputs: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
        """[median, q75, q90, H] of the probe losses, on the device."""
        losses = probe_losses(self.model, inputs, targets, loss).float()
        levels = torch.tensor([0.5, 0.75, 0.9], dtype=losses.dtype, device=losses.device)
        qs = torch.quantile(losses, levels)
        chance = self.tracker.chance_loss if self.tracker is not None else None
        h = (
            (losses > chance).float().mean()
            if chance is not None
            else torch.zeros((), device=losses.device)
        )
        return torch.cat([qs, h.reshape(1)])

    def _capture_off(self, fn: Any) -> None:
        """Run fn with the per-example capture paused (probe passes must not feed it)."""
        capturing = self.per_example is not None and self.per_example.active
        if self.per_example is not None:
            self.per_example.active = False
        try:
            fn()
        finally:
            if self.per_example is not None:
                self.per_example.active = capturing

    def _publish(self, step: int, host: dict[str, list[float]], estimator: int, warm: bool) -> None:
        nl = len(self.params)
        overall = host["overall"]
        per_layer = host["per_layer"]
        nonfinite = host["nonfinite"][0]
        hist = host.get("hist", [])
        now = time.perf_counter()
        wall = max(now - self._window_start, 1e-9)
        stats = self.run.sender_stats()
        # The sender thread's CPU time is the agent's too: on a machine whose cores the
        # training step already uses, every second of it is taken from the step.
        sender_cpu = float(stats.get("cpu_s", 0.0))
        sender_s = max(sender_cpu - self._sender_cpu, 0.0)
        self._sender_cpu = sender_cpu
        overhead = (self._agent_s + sender_s) / wall
        if step > 0:
            # The schedule follows a smoothed ratio: one window's cost is lumpy (the sender
            # thread's CPU lands in whichever window it ran in), and acting on single
            # windows made the schedule flap between two strides.
            self._cost_sum = self._cost_sum / 2 + self._agent_s - self._spectrum_s + sender_s
            self._wall_sum = self._wall_sum / 2 + wall
            self._adapt(self._cost_sum / self._wall_sum)
        self._agent_s, self._spectrum_s, self._window_start = 0.0, 0.0, now
        scalars: dict[str, float] = {
            "agent/dropped": float(stats.get("dropped", 0)),
            "agent/stride": float(self.stride),
            "agent/emit_every": float(self.emit_interval),
            "signal/estimator": float(estimator),
        }
        t = time.time()
        # Built here from floats (the host transfer's lists): the sender skips their checks.
        records: list[tuple[str, dict[str, Any]]] = []
        if warm:
            for i, _, scalar in self._fields:
                scalars[scalar] = overall[i]
            scalars["signal/occupancy_stderr"] = st.occupancy_stderr(
                overall[st.OCCUPANCY], self.n_coords
            )
            layers = {name: per_layer[i * nl : (i + 1) * nl] for i, name, _ in self._fields}
            records.append(("layers", {"step": step, "t": t, "l": layers}))
            if hist:
                bins = len(st.HIST_EDGES) - 1
                counts = [[int(c) for c in hist[i * bins : (i + 1) * bins]] for i in range(nl)]
                records.append(
                    ("hist", {"step": step, "t": t, "edges": st.HIST_EDGES, "counts": counts})
                )
        if step > 0:  # the first window holds no whole training step to compare with
            scalars["agent/overhead"] = overhead
        if warm and self.tracker is not None:
            scalars.update(self._memorization(step, host))
        records.append(("scalars", {"step": step, "t": t, "s": scalars}))
        self.run.emit_many(records, check=False)
        if nonfinite > self._reported_nonfinite:
            self.run.event(
                "non_finite",
                f"non-finite gradient in {int(nonfinite - self._reported_nonfinite)} step(s) "
                f"before step {step}; skipped by the statistics",
                severity="error",
                step=step,
                data={"steps": int(nonfinite)},
            )
            self._reported_nonfinite = nonfinite

    def _memorization(self, step: int, host: dict[str, list[float]]) -> dict[str, float]:
        """Feed the tracker this window's rates and probe summaries; publish its events."""
        tracker = self.tracker
        assert tracker is not None
        window = max(step - self._last_emit_step, 1)
        self._last_emit_step = step
        lr = float(self.optimizer.param_groups[0].get("lr", 0.0))
        t_rate, q_rate = host["tq"]
        tracker.observe_gradient(t_rate, q_rate, lr, window)
        out = {
            "memorization/train_progress": tracker.train_progress,
            "memorization/population_progress": tracker.population_progress,
            "memorization/gradient_score": tracker.gradient_score(),
        }
        if "tail" in host:
            med, q75, q90, h = host["tail"]
            tracker.observe_tail(
                TailStatistics(med, q75, q90, h),
                min(self._probe_window, 10 * tracker.settings.probe_every),
                step,
            )
            out.update(
                {
                    "memorization/probe_loss_median": med,
                    "memorization/probe_loss_q75": q75,
                    "memorization/probe_loss_q90": q90,
                    "memorization/disagree_fraction": h,
                }
            )
        out["memorization/tail_score"] = tracker.tail_score()
        exact = self._exact
        if exact is not None and exact.dof >= 1 and any(exact.layers):
            # The exact gate's occupancy over the coordinates measured exactly this step
            # (layers the per-example capture cannot reach keep the streaming ŝ).
            nl = len(self.params)
            sizes = [hi - lo for lo, hi in self.bounds]
            pairs = [
                (host["per_layer"][i] * sizes[i], sizes[i]) for i in range(nl) if exact.layers[i]
            ]
            occupancy = sum(a for a, _ in pairs) / max(sum(n for _, n in pairs), 1)
            out["memorization/signal_excess"] = tracker.observe_signal(occupancy, exact.dof, step)
            descent = tracker.descent_excess()
            if descent is not None:
                out["memorization/descent_excess"] = descent
        out["memorization/signal_score"] = tracker.signal_score()
        out["memorization/score"] = tracker.score()
        for ev in tracker.step_onset(step):
            self.run.event(
                ev["kind"], ev["message"], severity=ev["severity"], step=ev["step"], data=ev["data"]
            )
        return out

    def observe_loss(self, value: float) -> None:
        """The training loss the user logs (``train/loss``), for the onset rule."""
        if self.tracker is not None:
            self.tracker.observe_loss(value)

    def _adapt(self, overhead: float) -> None:
        """Over budget: cut the work by the measured excess at once (so a run settles in
        one or two emissions), thinning the streaming update first and then spacing
        emissions out (up to MAX_EMIT_SCALE × emit_every); well under budget: undo one
        halving at a time, in reverse order, so the schedule does not oscillate."""
        if self.budget is None:
            return
        before = (self.stride, self.emit_interval)
        self._adapt_schedule(overhead)
        if (self.stride, self.emit_interval) != before:
            # Windows measured under the old schedule say nothing about the new one.
            self._cost_sum = self._wall_sum = 0.0

    def _adapt_schedule(self, overhead: float) -> None:
        assert self.budget is not None
        if overhead > self.budget:
            # Aim at 3/4 of the budget; work scales as 1/stride and 1/emit_interval.
            need = 2 ** math.ceil(math.log2(overhead / (0.75 * self.budget)))
            new_stride = min(self.stride * need, self.emit_interval)
            need = max(1, need * self.stride // new_stride)
            self.stride = new_stride
            if need > 1:
                limit = MAX_EMIT_SCALE * self.emit_every
                self.emit_interval = min(self.emit_interval * need, limit)
                self.stride = self.emit_interval
        elif overhead < self.budget / 4:
            if self.emit_interval > self.emit_every:
                self.emit_interval //= 2
                self.stride = min(self.stride, self.emit_interval)
            elif self.stride > 1:
                self.stride //= 2
