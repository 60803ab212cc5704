"""The Redis ACL recipe of docs/operations.md, against a real Redis: an agent user can
write its runs and nothing else."""

from __future__ import annotations

import pytest
import redis

import monitor_agent as cs
from monitor_agent import wire

RECIPE = [
    "on", ">agent-secret", "resetkeys", "~cs:run:*", "~cs:runs", "~cs:project:*", "~cs:projects",
    "resetchannels", "-@all", "+xadd", "+hset", "+zadd", "+sadd", "+ping",
]  # fmt: skip


def test_agent_acl_user_writes_runs_and_nothing_else(
    redis_client: redis.Redis, redis_url: str
) -> None:
    redis_client.acl_setuser("cs-agent", reset=True)
    redis_client.execute_command("ACL", "SETUSER", "cs-agent", *RECIPE)
    url = redis_url.replace("redis://", "redis://cs-agent:agent-secret@")
    with cs.init("acl", "limited", redis_url=url) as run:
        for step in range(50):
            run.log({"train/loss": 1.0 / (step + 1)}, step)
        run.event("note", "hello")
    assert run.sender_stats()["errors"] == 0
    entries = redis_client.xrange(run.keys.stream(run.id, "scalars"))
    assert [wire.decode("scalars", f)["step"] for _, f in entries] == list(range(50))
    limited = redis.Redis.from_url(url)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.hgetall("cs:tokens")
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.xrange(run.keys.stream(run.id, "scalars"))
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.flushall()
    finally:
        limited.close()
