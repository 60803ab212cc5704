from __future__ import annotations

import math
import random

import pytest
import redis
import torch
from torch import nn

import monitor_agent as cs
from monitor_agent import wire
from monitor_agent.memorization import (
    MemorizationTracker,
    OnsetRule,
    OnsetSettings,
    TailStatistics,
    null_occupancy,
)
from monitor_agent.run import Run


def test_onset_rule_arms_fires_and_clears_with_hysteresis() -> None:
    rule = OnsetRule(theta_on=0.5, theta_off=0.2, patience=3)
    scores = [0.1, 0.6, 0.1, 0.6, 0.7, 0.8, 0.9, 0.4, 0.1, 0.1, 0.3, 0.1, 0.1, 0.1]
    changes = [(i, rule.advance(i, s, True)) for i, s in enumerate(scores)]
    fired = [(i, c) for i, c in changes if c]
    assert fired == [(5, "onset"), (13, "cleared")]
    # onset is the first window of the run that fired, not the window it fired in
    rule2 = OnsetRule(0.5, 0.2, 3)
    for i, s in enumerate(scores[:6]):
        rule2.advance(i, s, True)
    assert rule2.onset_step == 3


def test_onset_needs_a_falling_training_loss_to_arm() -> None:
    rule = OnsetRule(0.5, 0.2, 2)
    assert [rule.advance(i, 0.9, False) for i in range(5)] == [None] * 5
    assert [rule.advance(i, 0.9, True) for i in range(5, 7)] == [None, "onset"]


def test_tail_score_tracks_the_disagreeing_fraction_after_the_bulk_is_fitted() -> None:
    fitted = OnsetSettings(ema_steps=1, reference="fitted")
    tracker = MemorizationTracker(0.05, chance_loss=2.3, settings=fitted)
    tracker.observe_tail(TailStatistics(median=1.5, q75=2.0, q90=3.0, disagree=0.4), 50, 300)
    assert tracker.h_ref is None  # bulk not fitted yet
    tracker.observe_tail(TailStatistics(0.1, 1.0, 5.0, 0.2), 50, 350)
    assert tracker.h_ref == pytest.approx(0.2)
    tracker.observe_tail(TailStatistics(0.05, 0.5, 4.0, 0.1), 50, 400)
    assert tracker.tail_score() == pytest.approx(0.5)
    small = MemorizationTracker(
        0.05, 2.3, OnsetSettings(ema_steps=1, min_reference=0.3, reference="fitted")
    )
    small.observe_tail(TailStatistics(0.1, 1.0, 5.0, 0.2), 50, 300)
    small.observe_tail(TailStatistics(0.1, 1.0, 5.0, 0.0), 50, 350)
    assert small.tail_score() == 0.0


def test_a_tracker_on_its_own_reads_auto_as_the_tail_score() -> None:
    tracker = MemorizationTracker(0.05, 2.3, OnsetSettings(ema_steps=1))
    assert tracker.settings.score == "auto"
    for step, h in ((200, 0.4), (250, 0.1)):
        tracker.observe_tail(TailStatistics(1.0, 2.0, 3.0, h), 50, step)
    assert tracker.score() == pytest.approx(tracker.tail_score()) == pytest.approx(0.75)


def test_peak_reference_is_the_most_disagreement_after_warm_up() -> None:
    tracker = MemorizationTracker(0.05, 2.3, OnsetSettings(ema_steps=1, warmup_steps=200))
    tracker.observe_tail(TailStatistics(2.0, 2.0, 3.0, 0.6), 50, 100)  # warm-up: ignored
    assert tracker.h_ref is None
    for step, h in ((200, 0.3), (250, 0.35), (300, 0.2), (350, 0.07)):
        tracker.observe_tail(TailStatistics(1.0, 2.0, 3.0, h), 50, step)
    assert tracker.h_ref == pytest.approx(0.35)
    assert tracker.tail_score() == pytest.approx(0.8)


def test_peak_at_low_takes_the_reference_only_while_the_training_loss_is_at_its_low() -> None:
    settings = OnsetSettings(ema_steps=1, warmup_steps=200, reference="peak_at_low")
    tracker = MemorizationTracker(0.05, 2.3, settings)
    for step, loss, h in ((200, 1.0, 0.2), (250, 0.5, 0.25), (300, 3.0, 0.6), (350, 0.5, 0.1)):
        tracker.observe_loss(loss)  # a spike at 300: its disagreement is not a reference
        tracker.observe_tail(TailStatistics(1.0, 2.0, 3.0, h), 50, step)
    assert tracker.h_ref == pytest.approx(0.25)  # 0.5 again at 350 is at the low: counted
    assert tracker.tail_score() == pytest.approx(0.6)
    plain = MemorizationTracker(0.05, 2.3, OnsetSettings(ema_steps=1, warmup_steps=200))
    plain.observe_loss(3.0)
    plain.observe_loss(4.0)
    plain.observe_tail(TailStatistics(1.0, 2.0, 3.0, 0.6), 50, 200)
    assert plain.h_ref == pytest.approx(0.6)  # "peak" takes every probe after warm-up
    unlogged = MemorizationTracker(0.05, 2.3, settings)
    unlogged.observe_tail(TailStatistics(1.0, 2.0, 3.0, 0.3), 50, 200)
    assert unlogged.h_ref == pytest.approx(0.3)  # no loss logged: no gate


def test_signal_or_tail_is_the_larger_of_the_two_scores() -> None:
    settings = OnsetSettings(score="signal_or_tail", ema_steps=1, signal_window=100)
    tracker = MemorizationTracker(0.0, 2.3, settings)
    tracker.observe_excess(0.2, 200)  # signal: 1 − 0.2/0.25 = 0.2
    for step, h in ((200, 0.4), (250, 0.1)):  # tail: 0.75
        tracker.observe_tail(TailStatistics(1.0, 2.0, 3.0, h), 50, step)
    assert tracker.signal_score() == pytest.approx(0.2)
    assert tracker.score() == pytest.approx(0.75)
    tracker.observe_excess(-0.5, 260)
    tracker.observe_excess(-0.5, 270)  # median −0.5: signal 1
    assert tracker.score() == pytest.approx(1.0)


def test_settings_reject_an_unknown_score_or_reference() -> None:
    with pytest.raises(ValueError, match="memorization score 'median': expected one of"):
        OnsetSettings(score="median")
    with pytest.raises(ValueError, match="memorization reference 'max': expected one of"):
        OnsetSettings(reference="max")


def test_gradient_score_and_progress_curves() -> None:
    tracker = MemorizationTracker(0.1, None, OnsetSettings(score="gradient", ema_steps=10))
    for _ in range(50):
        tracker.observe_gradient(t_rate=2.0, q_rate=0.5, lr=0.1, steps=10)
    assert tracker.gradient_score() == pytest.approx(0.75, abs=1e-6)
    assert tracker.train_progress == pytest.approx(50 * 0.1 * 2.0 * 10)
    assert tracker.population_progress == pytest.approx(50 * 0.1 * 0.5 * 10)


def test_agent_publishes_scores_and_no_score_without_dataset_size(
    redis_url: str, redis_client: redis.Redis
) -> None:
    torch.manual_seed(random.randrange(10**6))
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(200, 8), torch.randint(0, 4, (200,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    runs = []
    for size in (200, None):
        with cs.init("t", f"mem-{size}", redis_url=redis_url) as run:
            kwargs = {"dataset_size": size} if size else {}
            if size is None:
                with pytest.warns(UserWarning, match="dataset_size"):
                    run.watch(
                        model, opt, batch_size=20, emit_every=10, probe=(x[:64], y[:64]), **kwargs
                    )
            else:
                run.watch(
                    model, opt, batch_size=20, emit_every=10, probe=(x[:64], y[:64]), **kwargs
                )
            for step in range(301):
                idx = torch.randint(0, 200, (20,))
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                opt.zero_grad()
                run.log({"train/loss": loss.item()}, step)
        runs.append(run)
    with_n = [
        wire.decode("scalars", f)["s"]
        for _, f in redis_client.xrange(runs[0].keys.stream(runs[0].id, "scalars"))
    ]
    mem = [s for s in with_n if "memorization/score" in s]
    assert mem
    assert all(0.0 <= s["memorization/score"] <= 1.0 for s in mem)
    assert any("memorization/disagree_fraction" in s for s in mem)
    assert mem[-1]["memorization/train_progress"] > 0
    without = [
        wire.decode("scalars", f)["s"]
        for _, f in redis_client.xrange(runs[1].keys.stream(runs[1].id, "scalars"))
    ]
    assert not any("memorization/score" in s for s in without)


def test_null_occupancy_matches_closed_forms_and_pure_noise_gradients() -> None:
    assert null_occupancy(1) == pytest.approx(0.5, abs=1e-9)  # Cauchy
    assert null_occupancy(2) == pytest.approx(1 - 1 / math.sqrt(3), abs=1e-9)
    assert null_occupancy(10**6) == pytest.approx(math.erfc(1 / math.sqrt(2)), abs=1e-9)
    with pytest.raises(ValueError, match="dof"):
        null_occupancy(0)
    # The leave-one-out gate on per-example gradients with no common signal opens at
    # that rate (standard error 0.001 over 200,000 coordinates).
    gen = torch.Generator().manual_seed(random.randrange(10**6))
    b = 16
    g = torch.randn(b, 200_000, generator=gen, dtype=torch.float64) * 3.0
    g_bar = g.mean(0)
    sigma = ((g - g_bar) ** 2).mean(0)
    occupancy = float((g_bar**2 > sigma / (b - 1)).double().mean())
    assert occupancy == pytest.approx(null_occupancy(b - 1), abs=0.005)


def test_signal_score_is_the_median_excess_over_its_window() -> None:
    settings = OnsetSettings(score="signal", signal_window=100, signal_scale=0.1)
    tracker = MemorizationTracker(0.0, None, settings)
    null = null_occupancy(99)

    def at(excess: float) -> float:
        return null + excess * (1 - null)

    assert tracker.signal_score() == 0.0  # nothing measured yet
    for step in range(0, 100, 10):  # no more coherent than noise: memorizing
        assert tracker.observe_signal(at(0.0), 99, step) == pytest.approx(0.0, abs=1e-12)
    assert tracker.signal_score() == pytest.approx(1.0)
    tracker.observe_signal(at(0.9), 99, 100)  # one loss spike does not move the median
    assert tracker.signal_score() == pytest.approx(1.0)
    for step in range(110, 220, 10):
        tracker.observe_signal(at(0.05), 99, step)
    assert tracker.signal_score() == pytest.approx(0.5)  # steps ≤ 110 have left the window
    for step in range(220, 330, 10):
        tracker.observe_signal(at(0.3), 99, step)
    assert tracker.signal_score() == 0.0
    assert tracker.score() == 0.0


def test_signal_score_stays_off_for_a_fit_reached_with_shared_signal() -> None:
    settings = OnsetSettings(score="signal", signal_window=100, signal_scale=0.25)

    def fitted_run(descent_excess: float) -> MemorizationTracker:
        """The loss falls from 2.0 to 0.02 over steps 0–90 with this excess, then the fitted
        gradient sits at chance (E = 0) through a loss spike and its recovery."""
        tracker = MemorizationTracker(0.0, None, settings)
        for step in range(0, 400, 10):
            loss = max(2.0 - 0.22 * step / 10, 0.02)
            if step == 200:
                loss = 3.0  # a spike: its recovery re-covers old ground
            tracker.observe_loss(loss)
            tracker.observe_excess(descent_excess if step < 100 else 0.0, step)
        return tracker

    generalized = fitted_run(0.6)
    # Weighted by the falls to new lows, step 0 (before any fall) carrying none.
    assert generalized.descent_excess() == pytest.approx(0.6)
    assert generalized.signal_score() == 0.0  # E_fit ≥ scale: the fit was signal
    memorized = fitted_run(-0.3)
    assert memorized.descent_excess() == pytest.approx(-0.3)
    assert memorized.signal_score() == pytest.approx(1.0)  # as before: at chance now
    halfway = fitted_run(0.125)
    assert halfway.signal_score() == pytest.approx(0.5)
    # Without a logged training loss the score is the plain median rule.
    tracker = MemorizationTracker(0.0, None, settings)
    for step in range(0, 100, 10):
        tracker.observe_excess(0.6 if step < 30 else 0.0, step)
    assert tracker.descent_excess() is None
    assert tracker.signal_score() == pytest.approx(1.0)


def _score_of(client: redis.Redis, run: Run) -> str:
    meta = wire.decode_meta(client.hgetall(run.keys.meta(run.id)))
    kind: str = meta["settings"]["memorization"]["score"]
    return kind


def _full_batch_run(
    redis_url: str, noise: str, batch: int, memorization: dict[str, str] | None = None
) -> Run:
    torch.manual_seed(random.randrange(10**6))
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(48, 6), torch.randint(0, 3, (48,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with cs.init("t", f"signal-{noise}-{batch}", redis_url=redis_url) as run:
        run.watch(
            model, opt, batch_size=batch, dataset_size=48, noise=noise, emit_every=5,
            probe=(x, y), memorization=memorization,
        )  # fmt: skip
        for step in range(40):
            idx = torch.arange(48) if batch == 48 else torch.randint(0, 48, (batch,))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.log({"train/loss": loss.item()}, step)
    return run


def _settings_of(client: redis.Redis, run: Run) -> dict[str, object]:
    settings: dict[str, object] = wire.decode_meta(client.hgetall(run.keys.meta(run.id)))[
        "settings"
    ]["memorization"]
    return settings


def test_full_batch_exact_training_uses_the_signal_score(
    redis_url: str, redis_client: redis.Redis
) -> None:
    default = _full_batch_run(redis_url, "per_example", 48)
    assert _score_of(redis_client, default) == "signal"
    assert _settings_of(redis_client, default)["reference"] == "peak"
    # Asked for, the larger of the signal and tail scores; the tail's reference then skips
    # probes taken in a training-loss spike.
    run = _full_batch_run(redis_url, "per_example", 48, {"score": "signal_or_tail"})
    assert _score_of(redis_client, run) == "signal_or_tail"
    assert _settings_of(redis_client, run)["reference"] == "peak_at_low"
    scalars = [
        wire.decode("scalars", f)["s"]
        for _, f in redis_client.xrange(run.keys.stream(run.id, "scalars"))
    ]
    excess = [s["memorization/signal_excess"] for s in scalars if "memorization/signal_excess" in s]
    assert excess and all(-1.0 <= e <= 1.0 for e in excess)
    # The descent excess is a loss-weighted mean of the excesses, once the loss has fallen.
    descent = [
        s["memorization/descent_excess"] for s in scalars if "memorization/descent_excess" in s
    ]
    assert descent and all(min(excess) - 1e-9 <= d <= max(excess) + 1e-9 for d in descent)
    assert all(
        0.0 <= s["memorization/signal_score"] <= 1.0
        for s in scalars
        if "memorization/signal_score" in s
    )
    # The score the onset rule uses is the larger of the two.
    assert all(
        s["memorization/score"] == max(s["memorization/signal_score"], s["memorization/tail_score"])
        for s in scalars
        if "memorization/score" in s
    )
    # noise="auto" (watch's default) on a full batch picks the per-example estimator, and
    # so the signal score; on mini-batches it stays streaming, with the tail score.
    auto = _full_batch_run(redis_url, "auto", 48)
    meta = wire.decode_meta(redis_client.hgetall(auto.keys.meta(auto.id)))["settings"]
    assert (meta["noise"], meta["noise_asked"]) == ("per_example", "auto")
    assert _score_of(redis_client, auto) == "signal"
    auto_mini = _full_batch_run(redis_url, "auto", 16)
    meta = wire.decode_meta(redis_client.hgetall(auto_mini.keys.meta(auto_mini.id)))["settings"]
    assert meta["noise"] == "auto" and _score_of(redis_client, auto_mini) == "tail"
    # Mini-batches: the batch gate says nothing about the training set; the tail score.
    assert _score_of(redis_client, _full_batch_run(redis_url, "per_example", 16)) == "tail"
    assert _score_of(redis_client, _full_batch_run(redis_url, "streaming", 48)) == "tail"
    with pytest.raises(ValueError, match="exact noise estimator"):
        _full_batch_run(redis_url, "streaming", 48, {"score": "signal"})
    with pytest.raises(ValueError, match="'signal_or_tail' needs an exact noise estimator"):
        _full_batch_run(redis_url, "streaming", 48, {"score": "signal_or_tail"})
    with pytest.raises(ValueError, match="expected one of"):
        _full_batch_run(redis_url, "streaming", 48, {"score": "median"})


def test_full_batch_regression_has_no_tail_beside_the_signal_score(
    redis_url: str, redis_client: redis.Redis
) -> None:
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with cs.init("t", "signal-regression", redis_url=redis_url) as run:
        run.watch(model, opt, batch_size=32, dataset_size=32, noise="per_example",
                  emit_every=5, probe=(x, y), memorization={"score": "signal_or_tail"})  # fmt: skip
        for step in range(10):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.log({"train/loss": loss.item()}, step)
    # No chance level to disagree with: the signal score alone.
    assert _score_of(redis_client, run) == "signal"
    assert _settings_of(redis_client, run)["reference"] == "peak"
