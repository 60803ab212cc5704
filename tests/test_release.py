"""Release hygiene: `python -m build` makes a wheel and an sdist that install in a fresh
virtual environment (without torch: the server needs none) and run."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_and_sdist_install_and_run(tmp_path: Path) -> None:
    pytest.importorskip("build", reason="the build package is not installed")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True)  # fmt: skip
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1
    assert len(sdists) == 1
    for artifact in (wheels[0], sdists[0]):
        env_dir = tmp_path / f"venv-{artifact.suffix}"
        venv.create(env_dir, with_pip=True)
        py = env_dir / "bin" / "python"
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"),
                        str(artifact)], check=True, capture_output=True)  # fmt: skip
        smoke = (
            "import monitor_agent, server, dashboard, monitor_agent.wire as w;"
            "from server.app import create_app; from server.settings import Settings;"
            "app = create_app(Settings(redis_url='redis://127.0.0.1:1/0'));"
            "assert '/api/runs' in app.openapi()['paths'];"
            "print(monitor_agent.__version__)"
        )
        out = subprocess.run([str(py), "-c", smoke], check=True, capture_output=True, text=True)
        assert out.stdout.strip() == "0.1.0"
        help_text = subprocess.run([str(env_dir / "bin" / "channelscope", ), "--help"],
                                   check=True, capture_output=True, text=True).stdout  # fmt: skip
        assert "serve" in help_text
