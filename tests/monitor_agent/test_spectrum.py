"""λ(W_s) against dense linear algebra, float64, fresh random inputs."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import redis
import torch
from torch import nn
from torch.func import functional_call, jacrev

import monitor_agent as cs
from monitor_agent import wire
from monitor_agent.kernel import ProbeKernel
from monitor_agent.linalg import lanczos, nystrom_eigs
from monitor_agent.watch import Monitor
from tests.monitor_agent.test_gradient_stats import MODELS


@pytest.fixture(autouse=True)
def float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _clustered_psd(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    top = torch.tensor([10.0, 9.99, 9.98, 5.0, 4.999, 2.0, 1.0, 0.999])
    rest = torch.rand(n - 8, generator=gen) * 0.5
    lam = torch.cat([top, rest])
    return (q * lam) @ q.T


def test_lanczos_top8_matches_eigh_on_clustered_spectra() -> None:
    gen = torch.Generator().manual_seed(random.randrange(10**9))
    for _ in range(3):
        a = _clustered_psd(300, gen)
        exact = torch.linalg.eigvalsh(a).flip(0)[:8]
        res = lanczos(lambda v, a=a: a @ v, 300, 8, tol=1e-12, max_iter=300, generator=gen)
        rel = ((res.values - exact).abs() / exact).max()
        assert rel <= 1e-8
        # warm start from the previous Ritz vectors converges in fewer products
        again = lanczos(lambda v, a=a: a @ v, 300, 8, tol=1e-12, max_iter=300, start=res.vectors)
        assert again.matvecs <= res.matvecs
        torch.testing.assert_close(again.values, exact, rtol=1e-8, atol=0)


def test_nystrom_top4_on_low_rank_plus_noise_increments() -> None:
    gen = torch.Generator().manual_seed(random.randrange(10**9))
    n, ell = 200, 24
    basis, _ = torch.linalg.qr(torch.randn(n, 4, generator=gen))
    omega = torch.randn(n, ell, generator=gen)
    total = torch.zeros(n, n)
    sketch = torch.zeros(n, ell)
    for _ in range(50):
        weights = torch.tensor([4.0, 3.0, 2.0, 1.0]) * (0.5 + torch.rand(4, generator=gen))
        noise = torch.randn(n, n, generator=gen) * 0.003
        inc = (basis * weights) @ basis.T + noise @ noise.T
        total += inc
        sketch += inc @ omega
    eigs, _ = nystrom_eigs(sketch, omega, 4)
    exact = torch.linalg.eigvalsh(total).flip(0)[:4]
    assert ((eigs - exact).abs() / exact).max() < 0.05


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("adam", [False, True])
def test_kernel_from_products_equals_explicit_jacobian(name: str, adam: bool) -> None:
    torch.manual_seed(random.randrange(10**9))
    model, x, y = MODELS[name]()
    kern = ProbeKernel(model, x, y, projections=2, seed=random.randrange(1000))
    params = {n: p.detach() for n, p in model.named_parameters()}
    precond = {n: torch.rand_like(p) + 0.1 for n, p in params.items()} if adam else None
    kern.chunk = 7  # several vmapped chunks, one of them ragged
    got = kern.explicit(precond)

    def fz(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        return kern._project(functional_call(model, ps, (x,)))

    jac = jacrev(fz)(params)
    j = torch.cat([jac[n].reshape(kern.size, -1) for n in params], dim=1)
    m = torch.cat([precond[n].reshape(-1) for n in params]) if precond else torch.ones(j.shape[1])
    want = (j * m) @ j.T / x.shape[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _linear_run(lr: float, steps: int, every: int) -> tuple[Monitor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(random.randrange(10**9))
    n, d = 12, 5
    x, y = torch.randn(n, d), torch.randn(n, 2)
    model = nn.Linear(d, 2, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    run = cs.init("t", "linear", mode="disabled")
    mon = run.watch(
        model, opt, batch_size=n, dataset_size=n, probe=(x, y), spectrum_every=every,
        projections=8, k=24,
    )  # fmt: skip
    assert isinstance(mon, Monitor)
    kern = mon.kernel
    assert kern is not None
    kmat = kern.explicit()
    for _ in range(steps + 1):  # the update at step `steps` covers steps 0..steps-1
        loss = 0.5 * (model(x) - y).pow(2).sum(dim=1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    run.finish()
    return mon, kmat, x


@pytest.mark.parametrize("every", [1, 7])
def test_linear_mse_sgd_gramian_equals_discrete_propagator(every: int) -> None:
    lr, steps = 0.05, 28
    mon, kmat, _ = _linear_run(lr, steps, every)
    assert mon.gramian is not None
    phi = torch.linalg.matrix_power(torch.eye(kmat.shape[0]) - lr * kmat, steps)
    want = 0.5 * (torch.eye(kmat.shape[0]) - phi.T @ phi)
    torch.testing.assert_close(mon.gramian.w, want, rtol=0, atol=1e-8)
    eigs = torch.linalg.eigvalsh(mon.gramian.w)
    assert eigs.min() >= -1e-12
    assert eigs.max() <= 0.5 + 1e-12


def test_small_steps_approach_the_continuous_formula() -> None:
    lr, steps = 1e-4, 2000
    mon, kmat, _ = _linear_run(lr, steps, 500)
    assert mon.gramian is not None
    lam, u = torch.linalg.eigh(kmat)
    want = (u * (0.5 * (1 - torch.exp(-2 * lr * steps * lam)))) @ u.T
    torch.testing.assert_close(mon.gramian.w, want, rtol=0, atol=1e-4)


def test_spectrum_is_published_and_training_state_untouched(
    redis_url: str, redis_client: redis.Redis
) -> None:
    torch.manual_seed(random.randrange(10**9))
    model = nn.Sequential(
        nn.Linear(6, 16), nn.Dropout(0.5), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)
    )
    x, y = torch.randn(64, 6), torch.randint(0, 4, (64,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with cs.init("t", "spectrum", redis_url=redis_url) as run:
        run.watch(
            model,
            opt,
            batch_size=16,
            dataset_size=64,
            probe=(x[:20], y[:20]),
            spectrum_every=5,
            k=4,
        )
        for step in range(21):
            idx = torch.randint(0, 64, (16,))
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            if step == 10:  # the spectrum update runs in this step's pre-hook
                grads = [p.grad.clone() for p in model.parameters()]
                running = model[2].running_mean.clone()
                rng = torch.get_rng_state()
                mon = run._monitor
                assert isinstance(mon, Monitor)
                mon._observe()
                mon.step -= 1  # undo the extra observation for the optimizer's own hook
                assert all(
                    torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True)
                )
                assert torch.equal(running, model[2].running_mean)
                assert torch.equal(rng, torch.get_rng_state())
                assert model.training
            opt.step()
            opt.zero_grad()
    entries = [
        wire.decode("spectrum", f)
        for _, f in redis_client.xrange(run.keys.stream(run.id, "spectrum"))
    ]
    assert [e["step"] for e in entries] == [5, 10, 15, 20]
    for e in entries:
        assert e["method"] == "exact"
        assert e["probe_size"] == 20
        assert len(e["w_eigs"]) == 4
        assert all(-1e-9 <= v <= 0.5 + 1e-9 for v in e["w_eigs"])
    scalars = [
        wire.decode("scalars", f)["s"]
        for _, f in redis_client.xrange(run.keys.stream(run.id, "scalars"))
    ]
    spec = [s for s in scalars if "spectrum/w_top1" in s]
    assert len(spec) == 4
    for name in (
        "spectrum/d_sig",
        "spectrum/effective_rank",
        "spectrum/residual_in_channel",
        "agent/spectrum_overhead",
    ):
        assert name in spec[-1]
    assert "spectrum/kernel_drift" in spec[-1]
    meta = wire.decode_meta(redis_client.hgetall(run.keys.meta(run.id)))
    assert meta["settings"]["spectrum"]["approximation"] is True


def test_sketch_path_for_large_probes() -> None:
    torch.manual_seed(random.randrange(10**9))
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))
    x, y = torch.randn(40, 5), torch.randn(40, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run = cs.init("t", "sketch", mode="disabled")
    mon = run.watch(
        model, opt, batch_size=40, dataset_size=40, probe=(x, y), spectrum_every=10,
        k=4, projections=3, exact_max=50,
    )  # fmt: skip
    assert isinstance(mon, Monitor)
    assert mon.gramian is not None
    assert not mon.gramian.exact
    kerns = []
    for _ in range(31):
        if mon.step % 10 == 0 and mon.step > 0:
            assert mon.kernel is not None
            kerns.append(mon.kernel.explicit())
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    # Ŵ = Σ h K̃ over windows, each kernel frozen at the end of its window
    assert mon.kernel is not None
    what = 0.05 * 10 * sum(kerns)
    omega = mon.gramian.omega
    torch.testing.assert_close(mon.gramian.sketch, what @ omega, rtol=1e-8, atol=1e-10)
    # the recovered top-k is the Nyström approximation Y (ΩᵀY)⁺ Yᵀ of Ŵ, which never
    # exceeds Ŵ; its accuracy on a decaying spectrum is tested above
    y = what @ omega
    nys = torch.linalg.eigvalsh(y @ torch.linalg.pinv(omega.T @ y) @ y.T).flip(0)[:4]
    eigs, _ = nystrom_eigs(mon.gramian.sketch, omega, 4)
    torch.testing.assert_close(eigs, nys, rtol=1e-6, atol=1e-8)
    assert (eigs <= torch.linalg.eigvalsh(what).flip(0)[:4] + 1e-8).all()
    run.finish()


def test_sketch_update_agrees_whether_j_is_held_built_in_blocks_or_absent() -> None:
    """The three ways a sketch update reaches K̃ (J held whole, K̃ built from blocks of J,
    kernel-vector products) give the same sketch and kernel spectrum."""
    from monitor_agent.spectrum import GramianTracker

    torch.manual_seed(random.randrange(10**9))
    model, x, y = MODELS["cnn"]()
    roomy = ProbeKernel(model, x, y, projections=2)
    largest = max(p.numel() for p in model.parameters())
    kernels = {
        "held": roomy,
        "blocks": ProbeKernel(model, x, y, projections=2,
                              memory_limit=max(2 * roomy.size * 8 * largest,
                                               4 * roomy.size**2 * 8)),
        "products": ProbeKernel(model, x, y, projections=2, memory_limit=1),
    }  # fmt: skip
    assert kernels["blocks"].blocks_build_explicit()
    assert not kernels["products"].blocks_build_explicit()
    precond = {n: torch.rand_like(p) + 0.1 for n, p in model.named_parameters()}
    reports = {}
    for name, kern in kernels.items():
        tracker = GramianTracker(kern, 3, exact_max=0, seed=7)
        with kern.materialized() as held:
            assert held == (name == "held")
        reports[name] = (tracker.update([0.01, 0.02], precond), tracker.sketch)
    want = torch.linalg.eigvalsh(roomy.explicit(precond)).flip(0)[:3]
    for name, (report, sketch) in reports.items():
        assert report.method == "sketch"
        torch.testing.assert_close(sketch, reports["products"][1], rtol=1e-9, atol=1e-12)
        got = torch.tensor(report.kernel_eigs)
        # The update's Lanczos stops once every Ritz residual is ≤ 1e-4·θ₁, which bounds
        # each Ritz value's distance to an eigenvalue by the same (an rtol of 1e-6 failed
        # about one seed in twenty, on the third value at ~2e-6).
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want[0]), msg=name)


def test_exact_path_beyond_the_products_limit_only_when_blocks_build_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from monitor_agent import spectrum

    torch.manual_seed(random.randrange(10**9))
    model, x, y = MODELS["mlp"]()
    monkeypatch.setattr(spectrum, "PRODUCTS_EXACT_MAX", 4)
    roomy = ProbeKernel(model, x, y, projections=2)
    starved = ProbeKernel(model, x, y, projections=2, memory_limit=1)
    assert roomy.size > 4
    assert spectrum.GramianTracker(roomy, 3).exact
    assert not spectrum.GramianTracker(starved, 3).exact  # products only: sketch
    assert not spectrum.GramianTracker(roomy, 3, exact_max=roomy.size - 1).exact


def test_auto_schedule_keeps_the_amortized_cost_under_budget() -> None:
    from monitor_agent.spectrum import SpectrumSchedule

    sched = SpectrumSchedule("auto", budget=0.03)
    assert sched.every == 500
    assert not sched.due(499)
    assert sched.due(500)
    sched.last_time -= 5.0  # 500 steps took 5 s in all: 10 ms a step
    sched.done(500, cost_s=1.5)  # one update costs 150 steps
    # 1.5 s / (0.03 * ~7 ms) ≈ 7000 steps between updates
    assert 4000 < sched.every < 9000
    assert not sched.due(500 + sched.every - 1)
    assert sched.due(500 + sched.every)
    with pytest.raises(ValueError, match="spectrum_every"):
        SpectrumSchedule(0, budget=0.03)


def test_kernel_through_torch_transformer_layers_matches_jacrev() -> None:
    """nn.TransformerEncoderLayer's fused paths have no forward AD: the probe must avoid them."""
    from monitor_agent.demo import TinyTransformer, modular_addition

    torch.manual_seed(random.randrange(10**9))
    task = modular_addition(11, seed=random.randrange(100))
    model = TinyTransformer(12, 11, d=8, heads=2)
    x, y = task.train_x[:6], task.train_y[:6]
    kern = ProbeKernel(model, x, y, projections=2)
    got = kern.explicit()
    params = {n: p.detach() for n, p in model.named_parameters()}

    def fz(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        return kern._project(functional_call(model, ps, (x,)))

    model.eval()
    jac = jacrev(fz)(params)
    model.train()
    j = torch.cat([jac[n].reshape(kern.size, -1) for n in params], dim=1)
    torch.testing.assert_close(got, j @ j.T / x.shape[0], rtol=1e-10, atol=1e-12)


def test_kernel_products_are_chunked_to_the_memory_limit() -> None:
    torch.manual_seed(random.randrange(10**9))
    model, x, y = MODELS["mlp"]()
    roomy = ProbeKernel(model, x, y, projections=2)
    n_params = sum(p.numel() for p in model.parameters())
    assert roomy.column_bytes > 2 * n_params * 8  # float64 models
    assert roomy.chunk >= roomy.size and roomy.example_chunk == roomy.n_probe
    # A limit that holds a third of the probe's activations: products run over chunks
    # of examples and of columns, and give the same K̃V.
    tight = ProbeKernel(model, x, y, projections=2, memory_limit=roomy.activation_bytes * 2 // 3)
    assert 1 <= tight.example_chunk < tight.n_probe // 2
    assert tight.chunk < 10
    v = torch.randn(roomy.size, 10, dtype=torch.float64)
    torch.testing.assert_close(tight.matmat(v), roomy.matmat(v), rtol=1e-12, atol=1e-12)
    precond = {n: torch.rand_like(p) + 0.1 for n, p in model.named_parameters()}
    torch.testing.assert_close(
        tight.matmat(v, precond), roomy.matmat(v, precond), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_per_example_jacobian_and_product_paths_agree(name: str) -> None:
    torch.manual_seed(random.randrange(10**9))
    model, x, y = MODELS[name]()
    fast = ProbeKernel(model, x, y, projections=2)
    slow = ProbeKernel(model, x, y, projections=2, memory_limit=1)  # nothing fits: products
    largest = max(p.numel() for p in model.parameters())
    split = ProbeKernel(model, x, y, projections=2, memory_limit=2 * fast.size * 8 * largest)
    groups = split._jacobian_groups()
    assert fast._jacobian_groups() is not None and slow._jacobian_groups() is None
    assert groups is not None and len(groups) > 1  # one block of J per group
    precond = {n: torch.rand_like(p) + 0.1 for n, p in model.named_parameters()}
    want = slow.explicit(precond)
    torch.testing.assert_close(fast.explicit(precond), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(split.explicit(precond), want, rtol=1e-10, atol=1e-12)
    v = torch.randn(fast.size, 5, dtype=torch.float64)
    with fast.materialized() as held, split.materialized() as split_held:
        assert held and not split_held  # J is held only when it fits in one block
        torch.testing.assert_close(
            fast.matmat(v, precond), slow.matmat(v, precond), rtol=1e-10, atol=1e-12
        )
        torch.testing.assert_close(fast.explicit(precond), want, rtol=1e-10, atol=1e-12)
    assert fast._held is None
