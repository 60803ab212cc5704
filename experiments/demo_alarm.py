"""The memorization alarm on the demo's run (`channelscope demo --runs 1`), against its
held-out accuracy, judged by the grokking target, live, replayed at other signal scales and
replayed with the opt-in signal_or_tail score.

Trains ``monitor_agent.demo.train`` (modular addition, 40 % of the pairs, 4,000 full-batch
steps) with the agent writing to an embedded Redis, reads back what the dashboard would show
(the alarm events and the logged ``val/acc`` and ``train/loss``), and prints the verdict::

    python -m experiments.demo_alarm [--steps 4000] [--seed 0] [--scales 0.1,0.25]

It also lists the training-loss spikes after the fit. ``--unwatched`` trains the same run
without the agent (``watch=False``), to show whether the agent has anything to do with them.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import monitor_agent as cs
from experiments.full_batch_scores import LeftChanceTracker
from experiments.run_all import DEFAULTS, _fmt, alarm_history, grokking_verdict
from experiments.runner import RunRecord, read_back, replay, replay_tracker
from monitor_agent import demo
from monitor_agent.memorization import MemorizationTracker
from server.embedded_redis import EmbeddedRedis


def demo_record(url: str, run: cs.Run, name: str) -> RunRecord:
    """The run's logged curves and the agent's series and alarm events."""
    rec = RunRecord(name, "demo")

    def curves(r: dict[str, Any]) -> None:
        if "val/acc" in r["s"] and "train/loss" in r["s"]:
            rec.steps.append(r["step"])
            rec.test_acc.append(r["s"]["val/acc"])
            rec.test_loss.append(r["s"]["val/loss"])
            rec.train_loss.append(r["s"]["train/loss"])

    read_back(url, run, rec, curves)
    return rec


def loss_spikes(rec: RunRecord, after: int, level: float = 1.0) -> list[int]:
    """Logged steps after ``after`` at which the training loss rises above ``level`` (the
    first logged step of each such stretch)."""
    starts, above = [], False
    for step, loss in zip(rec.steps, rec.train_loss, strict=True):
        high = step > after and loss > level
        if high and not above:
            starts.append(step)
        above = high
    return starts


def main(argv: list[str] | None = None) -> int:
    """Train the demo's run once and print its alarm against held-out accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scales",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[0.1, 0.25],
        help="signal scales to replay the run's recorded excess at (comma-separated)",
    )
    parser.add_argument(
        "--unwatched", action="store_true", help="train without the agent (no alarm to judge)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    server = EmbeddedRedis(Path(tempfile.mkdtemp()), appendonly=False).start()
    try:
        t0 = time.perf_counter()
        with cs.init("experiments", "demo alarm", redis_url=server.url) as run:
            demo.train(run, steps=args.steps, seed=args.seed, watch=not args.unwatched)
        rec = demo_record(server.url, run, f"demo seed={args.seed}")
    finally:
        server.stop()
    v = grokking_verdict(rec)
    fitted = v["fitted"] if isinstance(v["fitted"], int) else 0
    spikes = loss_spikes(rec, fitted)
    print(
        f"training loss above 1.0 after the fit ({'without' if args.unwatched else 'with'} the "
        f"agent): {len(spikes)} time(s), at {', '.join(map(str, spikes)) or '—'}"
    )
    if args.unwatched:
        return 0
    history = alarm_history(rec.events)
    print(
        f"{rec.name}: {args.steps} steps in {time.perf_counter() - t0:.0f} s; alarm: "
        f"{history or 'none'}; training set fitted at {v['fitted']}, held-out accuracy 50 % at "
        f"{v['rising']}, 90 % at {v['jump']}; target {'met' if v['met'] else 'not met'}"
    )
    for scale in args.scales:
        events = replay(rec, DEFAULTS.signal_window, scale)
        v = grokking_verdict(replace(rec, events=events))
        history = alarm_history(events)
        print(
            f"  replayed at signal scale {scale:g}: {history or 'none'}; target "
            f"{'met' if v['met'] else 'not met'}"
        )
    # The opt-in signal_or_tail score on the same run: whether the tail's reference at
    # training-loss lows stays under its floor here (docs/concepts.md, "signal or tail"),
    # and the same with the disagreeing share smoothed only once the probe left chance.
    both = replace(DEFAULTS, score="signal_or_tail")
    modulus = inspect.signature(demo.train).parameters["p"].default
    for label, tracker in (
        ("signal_or_tail", MemorizationTracker(0.0, None, both)),
        ("signal_or_tail, H̄ from leaving chance", LeftChanceTracker(0.0, math.log(modulus), both)),
    ):
        events = replay_tracker(rec, tracker)
        v = grokking_verdict(replace(rec, events=events))
        print(
            f"  replayed with score {label}: {alarm_history(events) or 'none'}; tail reference "
            f"{_fmt(tracker.h_ref, 3)} (floor {DEFAULTS.min_reference}); target "
            f"{'met' if v['met'] else 'not met'}"
        )
    last = rec.steps[-1] if rec.steps else None
    if last is not None:
        print(
            f"last logged step {last}: held-out accuracy {rec.test_acc[-1]:.2f}, "
            f"training loss {rec.train_loss[-1]:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
