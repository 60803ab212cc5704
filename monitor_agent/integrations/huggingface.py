"""A Hugging Face transformers ``TrainerCallback``.

    trainer = Trainer(..., callbacks=[ChannelscopeHFCallback("project", batch_size=32)])

Gradients are read in ``on_pre_optimizer_step``; ``on_log`` forwards the Trainer's logs
(``loss`` becomes ``train/loss``). Only the main process publishes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback

from monitor_agent.run import Run, init


class ChannelscopeHFCallback(TrainerCallback):
    """Streams a transformers Trainer run to channelscope."""

    def __init__(
        self,
        project: str,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        redis_url: str | None = None,
        *,
        batch_size: int | None = None,
        **watch_kwargs: Any,
    ) -> None:
        self.project, self.name, self.config, self.redis_url = project, name, config, redis_url
        self.batch_size = batch_size
        self.watch_kwargs = watch_kwargs
        self.run: Run | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:  # fmt: skip
        self.run = init(
            self.project, self.name or args.run_name or "trainer", self.config, self.redis_url
        )
        batch = self.batch_size or args.per_device_train_batch_size * max(
            args.gradient_accumulation_steps, 1
        )
        self.run.watch(model, optimizer, batch_size=batch, hook="manual", **self.watch_kwargs)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is not None and self.run._monitor is not None:
            self.run._monitor.observe_step()

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None,
               **kwargs: Any) -> None:  # fmt: skip
        if self.run is None or not logs:
            return
        values = {
            ("train/loss" if k == "loss" else k): v
            for k, v in logs.items()
            if isinstance(v, int | float)
        }
        self.run.log(values, step=state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is not None:
            self.run.finish()
