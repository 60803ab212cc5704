from __future__ import annotations

import subprocess
import sys


def test_importing_the_agent_pulls_no_server_dashboard_torch_or_numba() -> None:
    code = (
        "import sys, monitor_agent, monitor_agent.wire\n"
        "heavy = [m for m in ('fastapi', 'dash', 'plotly', 'torch', 'numba', 'server', 'dashboard')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
