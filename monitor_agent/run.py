"""A monitored run: metadata, user scalars, events, and the lifecycle of its sender."""

from __future__ import annotations

import atexit
import logging
import math
import operator
import os
import secrets
import socket
import threading
import time
import warnings
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import msgpack

from monitor_agent import wire
from monitor_agent.endpoint import ENV_MODE, ENV_PREFIX, home_dir, resolve_redis_url
from monitor_agent.sender import Op, Sender

log = logging.getLogger("monitor_agent")

MODES = ("online", "offline", "disabled")

# Records that come faster than this are held, in order, and handed to the sender
# together once it has passed since the last hand-off (or on flush, finish, or the
# sender's next idle wake-up, at most 0.2 s later). Encoding and queueing a record right
# after a training step costs several times what it costs in a burst
# (bench/results/agent_cold_calls.md: an emitted step's two records 122 µs queued at
# once right after a training step, 29 µs hot; 62 µs held), and at one emission a step
# that was most of the monitor's publishing cost.
HOLD_S = 0.05

# One held item: (stream kind, encoded fields) for a checked record, (stream kind,
# record) for one the agent built itself (encoded at the hand-off), (None, op) for an op
# that is not a stream entry (meta, sets).
_Held = tuple[str | None, Any, bool]


class _IdClock:
    """Strictly increasing Redis stream ids ``<ms>-<seq>`` from the wall clock.

    Explicit ids make replays idempotent: Redis rejects an id it has already passed.
    """

    def __init__(self) -> None:
        self._ms = 0
        self._seq = 0
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            now = int(time.time() * 1000)
            if now > self._ms:
                self._ms, self._seq = now, 0
            else:
                self._seq += 1
            return f"{self._ms}-{self._seq}"


def _new_run_id() -> str:
    return secrets.token_hex(4)


def _as_float(value: Any) -> float:
    # float() accepts Python numbers, numpy scalars and 0-d tensors alike.
    return float(value)


class Run:
    """One training run streaming to Redis; create it with :func:`monitor_agent.init`."""

    def __init__(
        self,
        project: str,
        name: str,
        config: Mapping[str, Any] | None = None,
        redis_url: str | None = None,
        *,
        run_id: str | None = None,
        tags: list[str] | None = None,
        mode: str | None = None,
        prefix: str | None = None,
        maxlen: int = wire.DEFAULT_MAXLEN,
        all_ranks: bool = False,
        resume: bool = False,
    ) -> None:
        if not wire.valid_project(project):
            raise ValueError(f"project {project!r}: use letters, digits, '_', '-', '.'")
        if resume and not run_id:
            raise ValueError("resume=True needs the run_id of the run to resume")
        run_id = run_id or _new_run_id()
        if not wire.valid_run_id(run_id):
            raise ValueError(f"run_id {run_id!r}: use letters, digits, '_' or '-'")
        mode = os.environ.get(ENV_MODE) or mode or "online"
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {MODES}")
        # Under torchrun every rank computes the same statistics; only rank 0 publishes.
        self.rank = int(os.environ.get("RANK", "0") or 0)
        if self.rank != 0 and not all_ranks:
            mode = "disabled"
        self.id = run_id
        self.project = project
        self.name = name
        self.mode = mode
        self.config = dict(config or {})
        self.keys = wire.Keys(os.environ.get(ENV_PREFIX) or prefix or wire.DEFAULT_PREFIX)
        self._maxlen = maxlen
        self._ids = _IdClock()
        self._step = -1
        self._finished = False
        self._nonfinite_seen: set[str] = set()
        self._bad_type_seen: set[str] = set()
        self._monitor: Any = None
        self._sender: Sender | None = None
        self._held: list[_Held] = []
        # Serializes holding and handing off: entry ids must reach the queue in the order
        # they are drawn, whichever thread logs.
        self._held_lock = threading.Lock()
        self._last_handoff = 0.0  # time.monotonic()
        self._hold_s = HOLD_S
        self._packer = msgpack.Packer(use_bin_type=True)  # used under _held_lock only
        if mode == "disabled":
            return
        explicit = redis_url

        def url_source() -> str | None:
            return None if mode == "offline" else resolve_redis_url(explicit)

        self._sender = Sender(
            url_source,
            home_dir() / "spool" / f"{run_id}.spool",
            on_batch=self._touch_ops,
            on_idle=self._handoff_stale,
        )
        now = time.time()
        if resume:
            # Keep the original start time and layers: only say the run is alive again.
            alive = {"status": "running", "resumed_at": now, "updated_at": now, "pid": os.getpid()}
            self._submit([("hset", self.keys.meta(run_id), wire.encode_meta(alive))])
            self.event("note", f"run resumed on {socket.gethostname()}", step=0)
            atexit.register(self._at_exit)
            return
        meta = {
            "project": project,
            "name": name,
            "config": self.config,
            "tags": list(tags or []),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": now,
            "updated_at": now,
            "status": "running",
            "layers": [],
            "settings": {},
        }
        self._submit(
            [
                ("hset", self.keys.meta(run_id), wire.encode_meta(meta)),
                ("sadd", self.keys.projects(), [project]),
            ]
        )
        self.event("run_started", f"run {name} started on {meta['host']}", step=0)
        atexit.register(self._at_exit)

    # ----- plumbing -------------------------------------------------------------------
    def _touch_ops(self, with_records: bool) -> list[Op]:
        # updated_at is the heartbeat (the server tells a crash by it); last_record_at
        # moves only with data (the server tells a stalled run by it).
        now = time.time()
        fields = {"updated_at": str(now), "step": str(max(self._step, 0))}
        if with_records:
            fields["last_record_at"] = str(now)
        return [
            ("zadd", self.keys.runs(), {self.id: now}),
            ("zadd", self.keys.project_runs(self.project), {self.id: now}),
            ("hset", self.keys.meta(self.id), fields),
        ]

    def _submit(self, ops: list[Op]) -> None:
        if self._sender is not None and not self._finished:
            self._hold([(None, op, True) for op in ops], stacklevel=3)

    def emit(self, kind: str, record: Mapping[str, Any]) -> None:
        """Queue one record of a stream kind (scalars, layers, hist, spectrum); never blocks."""
        self._queue([(kind, record)], check=True, stacklevel=4)

    def emit_many(self, records: list[tuple[str, Mapping[str, Any]]], check: bool = True) -> None:
        """Queue several records (kind, record) in order; never blocks. ``check=False``
        skips validation and encodes at the hand-off to the sender, for records the agent
        builds itself (a monitor's emitted step), which must not change afterwards."""
        self._queue(records, check=check, stacklevel=3)

    def _queue(
        self, records: list[tuple[str, Mapping[str, Any]]], check: bool, stacklevel: int
    ) -> None:
        """Hold records for the sender: checked ones are encoded now, so that one that
        cannot be is left out with a warning at ``stacklevel`` (the caller's caller),
        never raised into the training step (a failed check, or a value msgpack cannot
        pack); unchecked ones are encoded at the hand-off."""
        if self._sender is None or self._finished:
            return
        held: list[_Held] = []
        for kind, record in records:
            if not check:
                held.append((kind, record, False))
                continue
            try:
                held.append((kind, wire.encode(kind, record), True))
            except (wire.WireError, TypeError, ValueError, OverflowError) as exc:
                warnings.warn(f"channelscope: {kind} record not sent: {exc}", stacklevel=stacklevel)
        if held:
            self._hold(held, stacklevel + 1)

    def _hold(self, items: list[_Held], stacklevel: int) -> None:
        """Append items behind those held; hand them all off once HOLD_S has passed since
        the last hand-off."""
        with self._held_lock:
            self._held.extend(items)
            if time.monotonic() - self._last_handoff >= self._hold_s:
                self._handoff(stacklevel + 1)

    def _handoff_stale(self) -> None:
        """Hand off records held for HOLD_S or longer (the sender thread, when idle)."""
        with self._held_lock:
            if self._held and time.monotonic() - self._last_handoff >= self._hold_s:
                self._handoff(2)

    def _handoff(self, stacklevel: int) -> None:
        """Encode what is held, draw its entry ids and queue it as one batch; under
        _held_lock. An unchecked record that cannot be encoded is left out with a warning."""
        held, self._held = self._held, []
        self._last_handoff = time.monotonic()
        ops: list[Op] = []
        failed: list[str] = []
        for kind, payload, encoded in held:
            if kind is None:
                ops.append(payload)
                continue
            if not encoded:
                try:
                    payload = wire.encode(kind, payload, check=False, packer=self._packer)
                except (wire.WireError, TypeError, ValueError, OverflowError) as exc:
                    failed.append(f"channelscope: {kind} record not sent: {exc}")
                    continue
            entry = (self._ids.next(), payload, self._maxlen)
            ops.append(("xadd", self.keys.stream(self.id, kind), entry))
        if ops and self._sender is not None:
            self._sender.submit(ops)
        # Warned only once the rest is queued: a filter that turns warnings into errors
        # must not lose the records held with the bad one.
        for message in failed:
            warnings.warn(message, stacklevel=stacklevel)

    def update_meta(self, fields: Mapping[str, Any]) -> None:
        """Merge fields into the run's metadata hash (layers, settings, ...)."""
        self._submit([("hset", self.keys.meta(self.id), wire.encode_meta(fields))])

    # ----- public API -----------------------------------------------------------------
    @property
    def step(self) -> int:
        """The last step logged (-1 before the first)."""
        return self._step

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Record user scalars at a training step (after the step's loss is known).

        Never blocks and never raises on I/O trouble. Values that are not numbers are
        dropped with a warning, once per name. A non-finite value is kept (as NaN/Inf)
        and also raises one ``non_finite`` event per name.
        """
        if step is None:
            step = self._step + 1
        try:
            # Any integer type (numpy, 0-d tensor) is fine; floats and bools are not.
            step = operator.index(step) if not isinstance(step, bool) else -1
        except TypeError:
            step = -1
        if step < 0:
            raise ValueError("step must be a non-negative integer")
        self._step = max(self._step, step)
        values: dict[str, float] = {}
        for name, raw in metrics.items():
            key = str(name)
            try:
                value = _as_float(raw)
            except (TypeError, ValueError):
                if key not in self._bad_type_seen:
                    self._bad_type_seen.add(key)
                    warnings.warn(
                        f"channelscope: {key!r} is a {type(raw).__name__}, not a number; dropped",
                        stacklevel=2,
                    )
                continue
            values[key] = value
            if not math.isfinite(value) and key not in self._nonfinite_seen:
                self._nonfinite_seen.add(key)
                self.event(
                    "non_finite",
                    f"{key} became {value} at step {step}",
                    severity="error",
                    step=step,
                    data={"name": key, "value": str(value)},
                )
        if values:
            self.emit("scalars", {"step": step, "t": time.time(), "s": values})
            if self._monitor is not None and "train/loss" in values:
                self._monitor.observe_loss(values["train/loss"])

    def event(
        self,
        kind: str,
        message: str,
        *,
        severity: str = "info",
        step: int | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Record an event (DESIGN §4.6 kinds) at a step; never blocks."""
        record = {
            "kind": kind,
            "step": max(self._step, 0) if step is None else step,
            "t": time.time(),
            "severity": severity,
            "message": message,
            "data": dict(data or {}),
        }
        self.emit("events", record)

    def watch(self, model: Any, optimizer: Any, **kwargs: Any) -> Any:
        """Attach gradient statistics to a model and its optimizer (see monitor_agent.watch)."""
        from monitor_agent.watch import Monitor  # torch is imported only when watching

        if self._monitor is not None:
            self._monitor.detach()
        self._monitor = Monitor(self, model, optimizer, **kwargs)
        return self._monitor

    def unwatch(self) -> None:
        """Remove every hook that watch() installed."""
        if self._monitor is not None:
            self._monitor.detach()
            self._monitor = None

    def sender_stats(self) -> dict[str, Any]:
        """Counters of the sender thread: sent, spooled, replayed, dropped, errors."""
        if self._sender is None:
            return {}
        s = self._sender.stats
        return {
            "sent": s.sent,
            "spooled": s.spooled,
            "replayed": s.replayed,
            "dropped": s.dropped,
            "duplicates": s.duplicates,
            "errors": s.errors,
            "last_error": s.last_error,
            "cpu_s": s.cpu_s,
            "connected": s.connected,
        }

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until queued records were sent or spooled; True when done in time."""
        if self._sender is None:
            return True
        with self._held_lock:
            self._handoff(3)
        return self._sender.flush(timeout)

    def finish(self, status: str = "finished", timeout: float = 10.0) -> None:
        """Mark the run finished (or crashed) and deliver what is queued."""
        if self._finished:
            return
        self.unwatch()
        if self._sender is not None:
            self.event(
                "run_finished",
                f"run {status}",
                severity="info" if status == "finished" else "error",
                data={"status": status},
            )
            self.update_meta({"status": status, "finished_at": time.time()})
            with self._held_lock:
                self._handoff(3)
                self._finished = True
            self._sender.close(timeout)
            if self._sender.spool.pending():
                log.warning(
                    "channelscope: Redis unreachable; %s kept for replay", self._sender.spool.path
                )
        self._finished = True
        atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        self.finish(timeout=5.0)

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish("crashed" if exc_type is not None else "finished")


def init(
    project: str,
    name: str,
    config: Mapping[str, Any] | None = None,
    redis_url: str | None = None,
    **kwargs: Any,
) -> Run:
    """Start a run; the Redis URL comes from the argument, $CHANNELSCOPE_REDIS_URL, or
    the embedded server started by ``channelscope serve``."""
    return Run(project, name, config, redis_url, **kwargs)
