"""docker-compose.yml and the Dockerfile: `docker compose config` where the docker CLI has
compose, a structural check otherwise (this machine has no Docker engine)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


def test_compose_file_is_valid() -> None:
    path = ROOT / "docker-compose.yml"
    if _compose_available():
        subprocess.run(["docker", "compose", "-f", str(path), "config", "-q"], check=True)
    spec = yaml.safe_load(path.read_text())
    redis, server = spec["services"]["redis"], spec["services"]["server"]
    assert redis["image"] == "redis:7"
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--requirepass" in command
    assert "healthcheck" in redis
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert server["build"] == "."
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "healthcheck" in server
    assert "CHANNELSCOPE_REDIS_URL" in server["environment"]
    assert "redis-data" in spec["volumes"]


def test_dockerfile_installs_the_package_with_the_constraints() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11" in text
    assert "-c constraints.txt" in text
    assert "channelscope" in text.split("CMD", 1)[1]
