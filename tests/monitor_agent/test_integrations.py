"""Framework integrations, each with a real few-step training (skipped when the framework
is not installed)."""

from __future__ import annotations

import pytest
import redis
import torch
from torch import nn

from monitor_agent import wire


def _scalars(client: redis.Redis, run_id: str) -> list[dict[str, float]]:
    keys = wire.Keys()
    return [
        wire.decode("scalars", f)["s"] for _, f in client.xrange(keys.stream(run_id, "scalars"))
    ]


def test_lightning_callback(redis_url: str, redis_client: redis.Redis, tmp_path: object) -> None:
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed")
    from monitor_agent.integrations.lightning import ChannelscopeCallback

    class Module(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _i: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    data = torch.utils.data.TensorDataset(torch.randn(160, 6), torch.randint(0, 3, (160,)))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    cb = ChannelscopeCallback("integrations", "lightning", redis_url=redis_url, batch_size=16,
                              dataset_size=160, noise="per_example", emit_every=5)  # fmt: skip
    trainer = pl.Trainer(max_steps=30, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(Module(), loader)
    assert cb.run is not None
    rows = _scalars(redis_client, cb.run.id)
    assert any("train/loss" in r for r in rows)
    assert any("signal/occupancy" in r for r in rows)
    meta = wire.decode_meta(redis_client.hgetall(wire.Keys().meta(cb.run.id)))
    assert meta["status"] == "finished"


def test_huggingface_callback(redis_url: str, redis_client: redis.Redis, tmp_path: object) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    from monitor_agent.integrations.huggingface import ChannelscopeHFCallback

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    xs, ys = torch.randn(96, 6), torch.randint(0, 3, (96,))
    data = [{"x": xs[i], "labels": ys[i]} for i in range(96)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, logging_steps=2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    cb = ChannelscopeHFCallback("integrations", "hf", redis_url=redis_url, dataset_size=96,
                                noise="per_example", emit_every=2)  # fmt: skip
    trainer = transformers.Trainer(model=Tiny(), args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    assert cb.run is not None
    rows = _scalars(redis_client, cb.run.id)
    assert any("train/loss" in r for r in rows)
    assert any("signal/occupancy" in r for r in rows)


def test_decorator_wraps_a_training_function(redis_url: str, redis_client: redis.Redis) -> None:
    import monitor_agent as cs
    from monitor_agent.integrations.decorator import monitored

    @monitored("integrations", redis_url=redis_url)
    def train(steps: int, run: cs.Run) -> str:
        for step in range(steps):
            run.log({"train/loss": 1.0 / (step + 1)}, step)
        return run.id

    run_id = train(5)
    assert len(_scalars(redis_client, run_id)) == 5
    meta = wire.decode_meta(redis_client.hgetall(wire.Keys().meta(run_id)))
    assert meta["name"] == "train"
    assert meta["status"] == "finished"

    @monitored("integrations", redis_url=redis_url)
    def broken(run: cs.Run) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        broken()
