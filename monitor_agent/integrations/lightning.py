"""A PyTorch Lightning callback: ``Trainer(callbacks=[ChannelscopeCallback(...)])``.

Gradients are read in ``on_before_optimizer_step`` (after backward and gradient
clipping's unscale, before the update). Every rank computes; only rank 0 publishes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from monitor_agent.run import Run, init


class ChannelscopeCallback(pl.Callback):
    """Streams a Lightning run: logged metrics, gradient statistics, spectrum, memorization."""

    def __init__(
        self,
        project: str,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        redis_url: str | None = None,
        *,
        batch_size: int,
        **watch_kwargs: Any,
    ) -> None:
        self.project, self.name, self.config, self.redis_url = project, name, config, redis_url
        self.batch_size = batch_size
        self.watch_kwargs = watch_kwargs
        self.run: Run | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = self.name or type(pl_module).__name__
        # Ranks come from RANK, which Lightning's launchers set: only rank 0 publishes.
        self.run = init(self.project, name, self.config, self.redis_url)
        optimizer = trainer.optimizers[0]
        self.run.watch(
            pl_module, optimizer, batch_size=self.batch_size, hook="manual", **self.watch_kwargs
        )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.run is not None and self.run._monitor is not None:
            self.run._monitor.observe_step()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:  # fmt: skip
        if self.run is None:
            return
        metrics = {
            k: v
            for k, v in trainer.callback_metrics.items()
            if getattr(v, "numel", lambda: 1)() == 1
        }
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None:
            metrics["train/loss"] = loss
        self.run.log(metrics, step=trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run is not None:
            self.run.finish()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.run is not None:
            self.run.finish("crashed")
