"""Redis reply parsing in C (hiredis) against redis-py's pure-Python parser, on the two
paths that parse many replies: the agent's sender thread (a pipeline of XADDs, one reply
each) and the server's history reads (XRANGE of many entries). Interleaved rounds in one
process against a real local Redis; CPU time of the calling thread, reported as ratios.

    .venv/bin/python bench/redis_parser.py [--rounds 15]

Results go to bench/results/redis_parser.md (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import _AsyncHiredisParser, _AsyncRESP2Parser
from redis.connection import _HiredisParser, _RESP2Parser

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from monitor_agent import wire
from monitor_agent.sender import Op, write_ops
from server.embedded_redis import EmbeddedRedis

PARSERS: dict[str, tuple[Any, Any]] = {
    "python": (_RESP2Parser, _AsyncRESP2Parser),
    "hiredis": (_HiredisParser, _AsyncHiredisParser),
}
LAYERS = 6
FIELDS = 10


def _records(step: int) -> list[tuple[str, dict[bytes, bytes]]]:
    """One equal-cadence emitted step's records, scalars and per-layer fields, encoded as
    the monitor encodes them (unchecked)."""
    scalars = {f"signal/field{i}": 0.1 * i + step for i in range(25)}
    layers = {f"field{i}": [0.01 * j for j in range(LAYERS)] for i in range(FIELDS)}
    t = time.time()
    return [
        ("scalars", wire.encode("scalars", {"step": step, "t": t, "s": scalars}, check=False)),
        ("layers", wire.encode("layers", {"step": step, "t": t, "l": layers}, check=False)),
    ]


def _batch(run: str, steps: int, first: int) -> list[Op]:
    """The ops of ``steps`` emitted steps, as the sender thread pipelines them."""
    ops: list[Op] = []
    for step in range(first, first + steps):
        for n, (kind, fields) in enumerate(_records(step)):
            ops.append(("xadd", f"bench:{run}:{kind}", (f"{step + 1}-{n}", fields, 10_000)))
    return ops


def _cpu(fn: Callable[[], None]) -> float:
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=10, help="emitted steps per pipeline")
    parser.add_argument("--batches", type=int, default=50, help="pipelines per round")
    parser.add_argument("--entries", type=int, default=2_000, help="entries an XRANGE reads")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "redis_parser.md"))
    args = parser.parse_args()
    server = EmbeddedRedis(Path(tempfile.mkdtemp()), appendonly=False).start()
    sync = {
        name: redis.Redis(
            connection_pool=redis.ConnectionPool.from_url(server.url, parser_class=cls)
        )
        for name, (cls, _) in PARSERS.items()
    }
    loop = asyncio.new_event_loop()
    aio = {
        name: aioredis.Redis(
            connection_pool=aioredis.ConnectionPool.from_url(server.url, parser_class=cls)
        )
        for name, (_, cls) in PARSERS.items()
    }
    # The history a read parses: one stream of layer records.
    seed = sync["hiredis"]
    for start in range(0, args.entries, 500):
        write_ops(seed, _batch("history", 250, start // 2))
    key = "bench:history:layers"

    def read(name: str) -> None:
        loop.run_until_complete(aio[name].xrange(key, count=args.entries))

    send: dict[str, list[float]] = {name: [] for name in PARSERS}
    xrange: dict[str, list[float]] = {name: [] for name in PARSERS}
    steps_sent = {name: 0 for name in PARSERS}
    try:
        for name in PARSERS:  # warm-up: connections, code paths
            write_ops(sync[name], _batch(f"warm-{name}", args.batch, 0))
            read(name)
        for _ in range(args.rounds):
            for name in PARSERS:
                client = sync[name]
                batches = []
                for _ in range(args.batches):
                    batches.append(_batch(name, args.batch, steps_sent[name]))
                    steps_sent[name] += args.batch

                def deliver(
                    client: redis.Redis = client, batches: list[list[Op]] = batches
                ) -> None:
                    for ops in batches:
                        write_ops(client, ops)

                send[name].append(_cpu(deliver) / (args.batches * args.batch))
                xrange[name].append(_cpu(lambda name=name: read(name)))
    finally:
        for c in sync.values():
            c.close()
        for a in aio.values():
            loop.run_until_complete(a.aclose())
        loop.close()
        server.stop()
    # Encoding the records is the same work for both parsers: measured once, alone, so
    # that the sender's column can be read as the part the parser changes.
    encode = statistics.median(
        _cpu(lambda: [_records(i) for i in range(500)]) / 500 for _ in range(5)
    )
    med = {n: (statistics.median(send[n]), statistics.median(xrange[n])) for n in PARSERS}
    ratio_send = statistics.median(
        h / p for h, p in zip(send["hiredis"], send["python"], strict=True)
    )
    ratio_read = statistics.median(
        h / p for h, p in zip(xrange["hiredis"], xrange["python"], strict=True)
    )
    lines = [
        "# Redis reply parsing: hiredis against redis-py's Python parser",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"redis-py {redis.__version__}, {args.rounds} interleaved rounds; a real local Redis. "
        "CPU time of the calling thread.",
        "",
        f"* Sender: pipelines of {args.batch} emitted steps (a scalars and a layers record "
        f"each, {2 * args.batch} XADDs), {args.batches} pipelines a round; µs of CPU per "
        "emitted step, records already encoded (encoding them, the same for both, costs "
        f"{1e6 * encode:.0f} µs a step and is not in the column).",
        f"* Server read: XRANGE of {args.entries} layer records (asyncio client), ms of CPU.",
        "",
        "| parser | sender, µs / emitted step | XRANGE, ms |",
        "|---|---|---|",
    ]
    for n in PARSERS:
        lines.append(f"| {n} | {1e6 * med[n][0]:.1f} | {1e3 * med[n][1]:.2f} |")
    lines += [
        "",
        f"Median per-round ratio hiredis / python: sender {ratio_send:.2f}, "
        f"XRANGE {ratio_read:.2f}.",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
