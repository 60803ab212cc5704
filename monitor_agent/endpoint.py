"""Where the agent finds Redis: an explicit URL, the environment, or the embedded server.

`channelscope serve` with no configured URL starts an embedded redis-server and records
its URL in ``$CHANNELSCOPE_HOME/endpoint.json`` (default ``~/.channelscope``); an agent
on the same machine reads it, so it needs no configuration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV_URL = "CHANNELSCOPE_REDIS_URL"
ENV_HOME = "CHANNELSCOPE_HOME"
ENV_MODE = "CHANNELSCOPE_MODE"
ENV_PREFIX = "CHANNELSCOPE_PREFIX"


def home_dir() -> Path:
    """The per-user state folder (embedded Redis data, endpoint file, spools)."""
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".channelscope")


def endpoint_file() -> Path:
    """The file in which the embedded server records its Redis URL."""
    return home_dir() / "endpoint.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_endpoint(redis_url: str, pid: int) -> Path:
    """Record the embedded Redis URL for agents on this machine (atomic replace)."""
    path = endpoint_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"redis_url": redis_url, "pid": pid}))
    tmp.replace(path)
    return path


def read_endpoint() -> str | None:
    """The embedded Redis URL when its server process is alive, else None."""
    try:
        data: Any = json.loads(endpoint_file().read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    url, pid = data.get("redis_url"), data.get("pid")
    if not isinstance(url, str) or not isinstance(pid, int) or not _pid_alive(pid):
        return None
    return url


def resolve_redis_url(explicit: str | None = None) -> str | None:
    """The Redis URL to use: explicit argument, then $CHANNELSCOPE_REDIS_URL, then the
    embedded server's endpoint file; None when none is available (the agent spools)."""
    return explicit or os.environ.get(ENV_URL) or read_endpoint()
