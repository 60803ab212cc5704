"""The agent's only I/O path: a bounded queue drained by one sender thread.

The training thread calls :meth:`Sender.submit`, which never blocks and never raises on
I/O trouble. The sender thread pipelines writes to Redis. When Redis is unreachable the
batches go to an append-only local spool file and are replayed, in order, when it comes
back; while the spool holds anything, new batches go behind it so order is kept.

Stream entries are written with explicit ids chosen by the agent, so a replayed entry
that Redis already holds is rejected by Redis ("ID equal or smaller") instead of being
stored twice: replay is idempotent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import redis

log = logging.getLogger("monitor_agent")

# One write operation: (command, key, payload). Commands: xadd, hset, zadd, sadd.
Op = tuple[str, str, Any]

_STOP = object()


@dataclass
class SenderStats:
    """Counters the agent reports about its own I/O."""

    sent: int = 0
    spooled: int = 0
    replayed: int = 0
    dropped: int = 0
    duplicates: int = 0
    errors: int = 0
    last_error: str = ""
    connected: bool = False
    cpu_s: float = 0.0  # CPU time the sender thread has used (encoding, I/O syscalls)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class Spool:
    """An append-only file of msgpack-encoded ops, replayed from a saved offset."""

    def __init__(self, path: Path, limit_bytes: int) -> None:
        self.path = path
        self.offset_path = path.with_suffix(path.suffix + ".offset")
        self.limit_bytes = limit_bytes

    def size(self) -> int:
        """Bytes in the spool file (0 when absent)."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def pending(self) -> bool:
        """True while the spool holds ops not yet replayed."""
        return self.size() > self._offset()

    def append(self, ops: list[Op]) -> int:
        """Append ops; returns how many were dropped because the spool is full."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        room = self.limit_bytes - self.size()
        packer = msgpack.Packer(use_bin_type=True)
        dropped = 0
        with open(self.path, "ab") as fh:
            for op in ops:
                blob = packer.pack(list(op))
                if len(blob) > room:
                    dropped += 1
                    continue
                fh.write(blob)
                room -= len(blob)
            fh.flush()
            os.fsync(fh.fileno())
        return dropped

    def _offset(self) -> int:
        try:
            return int(self.offset_path.read_text())
        except (OSError, ValueError):
            return 0

    def _save_offset(self, offset: int) -> None:
        tmp = self.offset_path.with_suffix(".tmp")
        tmp.write_text(str(offset))
        tmp.replace(self.offset_path)

    def read_chunks(self, chunk: int) -> Any:
        """Yield (ops, end_offset) in file order, starting after the saved offset."""
        start = self._offset()
        with open(self.path, "rb") as fh:
            fh.seek(start)
            unpacker = msgpack.Unpacker(fh, raw=False, strict_map_key=False)
            batch: list[Op] = []
            for item in unpacker:
                batch.append((item[0], item[1], item[2]))
                if len(batch) >= chunk:
                    yield batch, start + unpacker.tell()
                    batch = []
            if batch:
                yield batch, start + unpacker.tell()

    def commit(self, offset: int) -> None:
        """Mark everything before offset as delivered; clears the file when all is."""
        if offset >= self.size():
            self.path.unlink(missing_ok=True)
            self.offset_path.unlink(missing_ok=True)
        else:
            self._save_offset(offset)


def _is_duplicate_id(exc: BaseException) -> bool:
    return isinstance(exc, redis.ResponseError) and "equal or smaller" in str(exc)


def write_ops(client: redis.Redis, ops: list[Op]) -> tuple[int, list[Exception]]:
    """Pipeline ops to Redis; returns (entries Redis already had, other errors). A lost
    connection raises, so the caller can keep the ops for later."""
    pipe = client.pipeline(transaction=False)
    for cmd, key, payload in ops:
        if cmd == "xadd":
            entry_id, fields, maxlen = payload
            pipe.xadd(key, fields, id=entry_id, maxlen=maxlen, approximate=True)
        elif cmd == "hset":
            pipe.hset(key, mapping=payload)
        elif cmd == "zadd":
            pipe.zadd(key, payload)
        elif cmd == "sadd":
            pipe.sadd(key, *payload)
        else:
            raise ValueError(f"unknown op {cmd!r}")
    duplicates, errors = 0, []
    for res in pipe.execute(raise_on_error=False):
        if isinstance(res, redis.ConnectionError | redis.TimeoutError):
            raise res
        if isinstance(res, Exception):
            if _is_duplicate_id(res):
                duplicates += 1
            else:
                errors.append(res)
    return duplicates, errors


def sync_spool(path: Path, url: str, chunk: int = 512) -> dict[str, int]:
    """Upload a spool file written while Redis was unreachable (``channelscope sync``).
    Safe to repeat: entries Redis already holds are skipped, and the file is removed once
    everything is delivered."""
    spool = Spool(path, limit_bytes=1 << 62)
    client = redis.Redis.from_url(url, socket_timeout=10.0)
    sent = duplicates = errors = 0
    try:
        for ops, end in spool.read_chunks(chunk):
            dup, errs = write_ops(client, ops)
            spool.commit(end)
            sent += len(ops)
            duplicates += dup
            errors += len(errs)
    finally:
        client.close()
    return {"ops": sent, "already_there": duplicates, "errors": errors}


class Sender:
    """Owns the queue, the sender thread, the Redis client and the spool of one run."""

    def __init__(
        self,
        url_source: Callable[[], str | None],
        spool_path: Path,
        *,
        queue_size: int = 20_000,
        spool_limit_bytes: int = 512 * 1024 * 1024,
        batch_size: int = 512,
        retry_every_s: float = 1.0,
        on_batch: Callable[[bool], list[Op]] | None = None,
        on_idle: Callable[[], None] | None = None,
        heartbeat_s: float = 5.0,
        linger_s: float = 0.05,
    ) -> None:
        self._url_source = url_source
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.spool = Spool(spool_path, spool_limit_bytes)
        self.stats = SenderStats()
        self._batch_size = batch_size
        self._retry_every_s = retry_every_s
        self._on_batch = on_batch
        self._on_idle = on_idle
        self._client: redis.Redis | None = None
        self._next_try = 0.0
        self._heartbeat_s = heartbeat_s
        self._linger_s = linger_s
        self._last_touch = 0.0
        self._thread = threading.Thread(target=self._loop, name="channelscope-sender", daemon=True)
        self._thread.start()

    # ----- training-thread side -------------------------------------------------------
    def submit(self, ops: list[Op]) -> bool:
        """Queue ops for sending without blocking; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(ops)
        except queue.Full:
            with self.stats.lock:
                self.stats.dropped += len(ops)
            return False
        return True

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued was sent or spooled; True when done in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return self._queue.unfinished_tasks == 0

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (to Redis or the spool) and stop the thread."""
        self.flush(timeout)
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=1.0)
        self._thread.join(timeout=max(1.0, timeout / 2))
        if self._client is not None:
            self._client.close()

    # ----- sender-thread side ---------------------------------------------------------
    def _connect(self) -> redis.Redis | None:
        if self._client is not None:
            return self._client
        now = time.monotonic()
        if now < self._next_try:
            return None
        self._next_try = now + self._retry_every_s
        url = self._url_source()
        if url is None:
            return None
        client = redis.Redis.from_url(url, socket_timeout=3.0, socket_connect_timeout=1.0)
        try:
            client.ping()
        except redis.RedisError as exc:
            self._note_error(exc)
            client.close()
            return None
        self._client = client
        self.stats.connected = True
        return client

    def _note_error(self, exc: BaseException) -> None:
        with self.stats.lock:
            self.stats.errors += 1
            self.stats.last_error = f"{type(exc).__name__}: {exc}"

    def _drop_client(self, exc: BaseException) -> None:
        self._note_error(exc)
        if self._client is not None:
            self._client.close()
        self._client = None
        self.stats.connected = False
        self._next_try = time.monotonic() + self._retry_every_s

    def _write(self, client: redis.Redis, ops: list[Op]) -> None:
        duplicates, errors = write_ops(client, ops)
        self.stats.duplicates += duplicates
        for exc in errors:
            self._note_error(exc)

    def _replay_spool(self, client: redis.Redis) -> bool:
        """Send the spool in order; True when it is empty afterwards."""
        for ops, end in self.spool.read_chunks(self._batch_size):
            self._write(client, ops)
            self.spool.commit(end)
            with self.stats.lock:
                self.stats.replayed += len(ops)
        return not self.spool.pending()

    def _deliver(self, ops: list[Op]) -> None:
        client = self._connect()
        if client is not None:
            try:
                if self.spool.pending() and not self._replay_spool(client):
                    raise redis.ConnectionError("spool not drained")
                if ops:
                    self._write(client, ops)
                    with self.stats.lock:
                        self.stats.sent += len(ops)
                return
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                self._drop_client(exc)
        if ops:
            dropped = self.spool.append(ops)
            with self.stats.lock:
                self.stats.spooled += len(ops) - dropped
                self.stats.dropped += dropped

    def _loop(self) -> None:
        stopping = False
        while True:
            batches: list[Any] = []
            try:
                batches.append(self._queue.get(timeout=0.2))
                # Linger a moment for more records: a delivery's fixed cost (touch ops, a
                # pipeline round trip) is paid once per batch, and at one record a step it
                # was most of the sender's CPU, which the training step competes for. It
                # sleeps through the linger rather than waiting on the queue, which would
                # wake it (and take the GIL from the training thread) on every record.
                # A backlog (a full batch already queued) goes out without waiting.
                if batches[-1] is not _STOP and self._queue.qsize() < self._batch_size - 1:
                    time.sleep(self._linger_s)
                while len(batches) < self._batch_size and batches[-1] is not _STOP:
                    batches.append(self._queue.get_nowait())
            except queue.Empty:
                if not batches and self._on_idle is not None:
                    # Nothing came for a while: the producer may be holding records
                    # (Run's hold); they are queued now and go out on the next turn.
                    try:
                        self._on_idle()
                    except Exception as exc:  # the sender thread must survive its callbacks
                        log.exception("channelscope sender: idle callback failed")
                        self._note_error(exc)
            ops: list[Op] = []
            for item in batches:
                if item is _STOP:
                    stopping = True
                else:
                    ops.extend(item)
            now = time.monotonic()
            # The touch ops (last-seen time, step) ride on every batch and double as a
            # heartbeat while training is quiet, so the server can tell a crash.
            if self._on_batch is not None and (ops or now - self._last_touch > self._heartbeat_s):
                ops.extend(self._on_batch(bool(ops)))
                self._last_touch = now
            try:
                if ops or self.spool.pending():
                    self._deliver(ops)
            except Exception as exc:  # the sender thread must survive any bug in a record
                log.exception("channelscope sender: unexpected error")
                self._note_error(exc)
            finally:
                for _ in batches:
                    self._queue.task_done()
                self.stats.cpu_s = time.thread_time()
            if stopping:
                # A last, immediate attempt to drain the spool before the run ends.
                self._next_try = 0.0
                if self.spool.pending():
                    try:
                        self._deliver([])
                    except Exception as exc:
                        self._note_error(exc)
                return
