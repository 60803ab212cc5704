"""Gradient statistics against brute-force per-example gradients (torch.func), float64."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

import pytest
import redis
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import monitor_agent as cs
from monitor_agent import cpu_kernels, wire
from monitor_agent.watch import Monitor


@pytest.fixture(autouse=True)
def float64() -> Iterator[None]:
    """Every test here runs in float64; the default is restored for other modules."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out: torch.Tensor = self.out(att @ v)
        return out


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.att = Attention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.att(self.ln1(x))
        out: torch.Tensor = x + self.mlp(self.ln2(x))
        return out


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 11, d: int = 8, seq: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.head = nn.Linear(d, vocab)
        self.seq = seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.blocks(self.embed(x))[:, -1])
        return out


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 3)
    )
    return model, torch.randn(12, 6), torch.randint(0, 3, (12,))


def _cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    )  # fmt: skip
    return model, torch.randn(10, 2, 6, 6), torch.randint(0, 3, (10,))


def _transformer() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = TinyTransformer()
    return model, torch.randint(0, 11, (9, 5)), torch.randint(0, 11, (9,))


MODELS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "transformer": _transformer,
}


def _brute_force(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ḡ and Σ/(b−1) per coordinate from per-example gradients by vmap, flattened in
    named_parameters order."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_i(ps: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ps, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    per = vmap(grad(loss_i), in_dims=(None, 0, 0))(params, x, y)
    g = torch.cat([per[n].reshape(x.shape[0], -1) for n in params], dim=1)
    b = x.shape[0]
    mean = g.mean(0)
    sigma = ((g - mean) ** 2).mean(0)
    return mean, sigma / (b - 1)


def _one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: str) -> Monitor:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    run = cs.init("t", "stats", mode="disabled")
    with pytest.warns(UserWarning, match="dataset_size"):
        mon = run.watch(
            model, opt, batch_size=x.shape[0], noise=noise, sample_fraction=1.0,
            emit_every=1, keep_snapshot=True,
        )  # fmt: skip
    if noise == "microbatch":
        for i in range(x.shape[0]):  # K = b micro-batches of one example, loss / K
            (nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]) / x.shape[0]).backward()
    else:
        nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    run.finish()
    assert isinstance(mon, Monitor)
    return mon


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("noise", ["per_example", "microbatch"])
def test_exact_estimators_match_vmap(name: str, noise: str) -> None:
    torch.manual_seed(random.randrange(10**9))
    model, x, y = MODELS[name]()
    g_ref, s_ref = _brute_force(model, x, y)
    mon = _one_step(model, x, y, noise)
    snap = mon.snapshot
    assert mon._last_estimator == (2 if noise == "per_example" else 1)
    torch.testing.assert_close(snap["g"], g_ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(snap["s"], s_ref, rtol=1e-10, atol=1e-14)
    # the gate agrees wherever it is not decided by rounding (dead ReLU units give 0 vs 0)
    gap = (g_ref**2 - s_ref).abs() > 1e-8 * (g_ref**2 + s_ref) + 1e-12 * float(s_ref.max())
    assert gap.float().mean() > 0.5
    assert torch.equal((snap["m2"] > snap["s"])[gap], (g_ref**2 > s_ref)[gap])


def test_per_example_capture_ignores_torch_func_transforms_inside_the_step() -> None:
    # A user (or an evaluation) may run torch.func over the model between backward and
    # the optimizer step: its forward passes are not the training step's.
    torch.manual_seed(random.randrange(10**9))
    model, x, y = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    run = cs.init("t", "stats", mode="disabled")
    with pytest.warns(UserWarning, match="dataset_size"):
        mon = run.watch(
            model, opt, batch_size=x.shape[0], noise="per_example", sample_fraction=1.0,
            emit_every=1, keep_snapshot=True,
        )  # fmt: skip
    nn.functional.cross_entropy(model(x), y).backward()
    g_ref, s_ref = _brute_force(model, x[:5], y[:5])  # vmap(grad) through the hooked modules
    del g_ref, s_ref
    opt.step()
    run.finish()
    assert isinstance(mon, Monitor)
    _, s_ref = _brute_force(model, x, y)
    torch.testing.assert_close(mon.snapshot["s"], s_ref, rtol=1e-10, atol=1e-14)


def test_leave_one_out_identity_on_random_gradients() -> None:
    b, p = 7, 50
    g = torch.randn(b, p) + torch.randn(p)
    mean = g.mean(0)
    sigma = ((g - mean) ** 2).mean(0)
    pairs = (g.sum(0) ** 2 - (g**2).sum(0)) / (b * (b - 1))  # mean over i≠j of g_i g_j
    torch.testing.assert_close(pairs, mean**2 - sigma / (b - 1), rtol=1e-12, atol=1e-12)


def test_sequence_linear_per_example_path_matches_vmap() -> None:
    torch.manual_seed(random.randrange(10**9))
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Flatten(), nn.Linear(18, 2))
    x = torch.randn(8, 3, 4)
    y = torch.randint(0, 2, (8,))
    g_ref, s_ref = _brute_force(model, x, y)
    mon = _one_step(model, x, y, "per_example")
    torch.testing.assert_close(mon.snapshot["s"], s_ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(mon.snapshot["g"], g_ref, rtol=1e-10, atol=1e-14)


def test_streaming_estimator_on_a_stationary_problem(
    redis_url: str, redis_client: redis.Redis
) -> None:
    torch.manual_seed(random.randrange(10**9))
    n, b, sigma = 4000, 32, 2.0
    noise_sd = sigma / math.sqrt(b)
    # half the coordinates carry signal well above the batch noise floor, half none
    mu = torch.where(torch.rand(n) < 0.5, 3.0 * noise_sd * torch.sign(torch.randn(n)), 0.0)
    truth = float((mu**2 > noise_sd**2).double().mean())
    param = nn.Parameter(torch.zeros(n))
    model = nn.Module()
    model.register_parameter("w", param)
    opt = torch.optim.SGD([param], lr=0.0)
    with cs.init("t", "streaming", redis_url=redis_url) as run:
        mon = run.watch(
            model, opt, batch_size=b, dataset_size=10**6, sample_fraction=1.0,
            emit_every=50, keep_snapshot=True, budget=None,
        )  # fmt: skip
        for _ in range(1001):
            param.grad = mu + noise_sd * torch.randn(n)
            opt.step()
    ratio = float((mon.streaming_noise(mon.beta) / noise_sd**2).mean())
    assert abs(ratio - 1) < 0.05
    entries = redis_client.xrange(run.keys.stream(run.id, "scalars"))
    last = [wire.decode("scalars", f)["s"] for _, f in entries][-2]
    assert last["signal/estimator"] == 0.0
    assert abs(last["signal/occupancy"] - truth) < 0.02


@pytest.mark.parametrize(("fused", "emit_every"), [(False, 5), (True, 1)])
def test_non_finite_gradient_is_reported_and_does_not_poison_state(
    redis_url: str, redis_client: redis.Redis, fused: bool, emit_every: int
) -> None:
    """Also with the fused CPU kernels emitting every step: the one-call emitted step finds
    the NaN in its gather and hands the step to the masking path."""
    if fused:
        assert cpu_kernels.load(wait=True), cpu_kernels.state()
    model = nn.Linear(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with cs.init("t", "nan", redis_url=redis_url) as run:
        mon = run.watch(
            model, opt, batch_size=8, dataset_size=100, emit_every=emit_every, budget=None,
            cpu_kernels=fused,
        )  # fmt: skip
        for step in range(20):
            loss = model(torch.randn(8, 5)).pow(2).mean()
            if step == 7:
                loss = loss * float("nan")
            loss.backward()
            saved = [p.detach().clone() for p in model.parameters()]
            opt.step()
            opt.zero_grad()
            if step == 7:  # the user's loop repairs its weights; the hook saw the NaN step
                with torch.no_grad():
                    for p, old in zip(model.parameters(), saved, strict=True):
                        p.copy_(old)
            assert torch.isfinite(mon.s).all()
            assert torch.isfinite(mon.m).all()
        assert (mon._plan is not None) == fused
    events = [
        wire.decode("events", f) for _, f in redis_client.xrange(run.keys.stream(run.id, "events"))
    ]
    assert [e["kind"] for e in events].count("non_finite") == 1


def test_unwatch_removes_every_hook() -> None:
    model, x, y = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = cs.init("t", "unwatch", mode="disabled")
    mon = run.watch(model, opt, batch_size=12, dataset_size=100, noise="per_example", emit_every=1)
    run.unwatch()
    before = mon.step
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert mon.step == before
    assert all(not m._forward_hooks for m in model.modules())
    assert not opt._optimizer_step_pre_hooks
    run.finish()
