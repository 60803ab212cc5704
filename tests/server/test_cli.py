"""The ``channelscope`` command's serving paths: a free port on request, a clear exit on a
busy one."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys


def _env(redis_url: str) -> dict[str, str]:
    return {**os.environ, "CHANNELSCOPE_REDIS_URL": redis_url}


def test_demo_on_port_zero_serves_on_a_free_port_and_says_which(redis_url: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "demo", "--steps", "3", "--exit", "--port", "0"],
        env=_env(redis_url), capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    found = re.search(r"channelscope dashboard: http://127\.0\.0\.1:(\d+)/", out.stdout)
    assert found, out.stdout
    port = int(found.group(1))
    assert port > 0
    assert re.search(rf"demo run \w+: http://127\.0\.0\.1:{port}/runs/\w+", out.stdout)


def test_serve_on_a_busy_port_exits_with_a_clear_message(redis_url: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
            env=_env(redis_url), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert out.returncode != 0
    assert f"could not start on 127.0.0.1:{port}" in out.stderr
    assert "in use" in out.stderr
