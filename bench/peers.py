"""The peers the agent-overhead benchmark compares with, each as one training-step closure.

Installed by ``make bench-peers`` in a separate virtual environment (.venv-peers, with
the torch constraint, and ``setuptools<81`` for cockpit). A peer that is missing or does
not support a model's layers raises Unsupported and its cell reads 'n/a'.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

Step = Callable[[], None]


class Unsupported(RuntimeError):
    """This peer cannot run on this model here."""


def plain_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Step:
    """One ordinary training step (the baseline every ratio divides by)."""

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _backpack_extended(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The model and loss extended by BackPACK, or Unsupported outside its whitelist."""
    from backpack import extend

    if any(
        isinstance(m, nn.BatchNorm2d | nn.TransformerEncoderLayer | nn.Embedding)
        for m in model.modules()
    ):
        raise Unsupported("layers outside BackPACK's whitelist")
    return extend(model), extend(nn.CrossEntropyLoss())


def vmap_variance(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Step:
    """Per-example gradients by torch.func.vmap every step, and their variance."""

    def loss_i(ps: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ps, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), yi.reshape(-1))

    per_example = vmap(grad(loss_i), in_dims=(None, 0, 0))
    if y.shape[0] != x.shape[0]:
        raise Unsupported("targets are per token")

    def step() -> None:
        params = {n: p.detach() for n, p in model.named_parameters()}
        grads = per_example(params, x, y)
        _ = [g.var(0) for g in grads.values()]
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def backpack_variance(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Step:
    """BackPACK's Variance extension every step."""
    try:
        from backpack import backpack
        from backpack.extensions import Variance
    except ImportError as exc:
        raise Unsupported("backpack-for-pytorch is not installed") from exc
    model, lossfn = _backpack_extended(model)

    def step() -> None:
        loss = lossfn(model(x), y)
        with backpack(Variance()):
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def cockpit_economy(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Step:
    """Cockpit's "economy" configuration plus MeanGSNR, every step."""
    try:
        from cockpit import Cockpit, quantities
        from cockpit.utils import schedules
        from cockpit.utils.configuration import configuration
    except ImportError as exc:
        raise Unsupported("cockpit-for-pytorch is not installed") from exc
    model, lossfn = _backpack_extended(model)
    individual = nn.CrossEntropyLoss(reduction="none")
    every_step = schedules.linear(1)  # equal cadence with the agent's every-step columns
    quants = [*configuration("economy", track_schedule=every_step), quantities.MeanGSNR(every_step)]
    cockpit = Cockpit(model.parameters(), quantities=quants)
    state = {"step": 0}

    def step() -> None:
        outputs = model(x)
        loss = lossfn(outputs, y)
        losses = individual(outputs, y)
        info = {
            "batch_size": x.shape[0],
            "individual_losses": losses,
            "loss": loss,
            "optimizer": opt,
        }
        with cockpit(state["step"], info=info):
            loss.backward(create_graph=cockpit.create_graph(state["step"]))
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1

    return step


def wandb_watch(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Step:
    """wandb.watch(log="gradients", log_freq=100), offline."""
    try:
        import wandb
    except ImportError as exc:
        raise Unsupported("wandb is not installed") from exc
    wandb.init(mode="offline", dir=tempfile.mkdtemp(), project="bench")
    wandb.watch(model, log="gradients", log_freq=100)
    return plain_step(model, opt, x, y)


PEERS: dict[str, Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor], Step]] = {
    "Cockpit economy + MeanGSNR": cockpit_economy,
    "BackPACK Variance": backpack_variance,
    "wandb.watch gradients/100": wandb_watch,
    "torch.func vmap variance": vmap_variance,
}


def describe(_: Any) -> str:
    """Versions of the installed peers (their distributions), for the report."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("backpack-for-pytorch", "cockpit-for-pytorch", "wandb"):
        try:
            out.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            out.append(f"{dist} not installed")
    return ", ".join(out)
