"""Loading the fused CPU kernels (``monitor_agent.cpu_statistics``, numba) for
``watch(cpu_kernels=True)``: once per process, in a background thread, so that no training
step waits for numba's import or compilation; until they are ready the torch path serves.
``CHANNELSCOPE_CPU_KERNELS=0`` turns them off. This module imports neither numba nor
torch: importing it costs nothing."""

from __future__ import annotations

import os
import threading
import warnings
from types import ModuleType
from typing import Any

_STATE: dict[str, Any] = {"module": None, "thread": None, "error": None}
_LOCK = threading.Lock()


def load(wait: bool = False) -> bool:
    """Start loading the kernels (numba compiles them the first time in an environment,
    several seconds of one core: 8.6 s in bench/results/statistics_compile.md; later it
    loads its cache) in a background thread; with ``wait``, block until done. True once
    they are ready; False while loading, when turned off, or without numba (the reason:
    state())."""
    with _LOCK:
        if _STATE["module"] is None and _STATE["error"] is None:
            if os.environ.get("CHANNELSCOPE_CPU_KERNELS", "1") == "0":
                _STATE["error"] = "turned off by CHANNELSCOPE_CPU_KERNELS=0"
            elif _STATE["thread"] is None:
                thread = threading.Thread(
                    target=_import, name="channelscope-cpu-kernels", daemon=True
                )
                _STATE["thread"] = thread
                thread.start()
        thread = _STATE["thread"]
    if wait and thread is not None:
        thread.join()
    return _STATE["module"] is not None


def _import() -> None:
    try:
        from monitor_agent import cpu_statistics

        _STATE["module"] = cpu_statistics
    except Exception as exc:  # numba missing or unable to compile: torch serves
        _STATE["error"] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"channelscope: fused CPU kernels unavailable ({_STATE['error']}); "
            "the agent uses torch ops (slower on the CPU)",
            stacklevel=1,
        )


def loaded() -> ModuleType | None:
    """The kernels' module once loaded, else None; never waits."""
    module: ModuleType | None = _STATE["module"]
    return module


def state() -> str:
    """'loaded', 'loading', 'not loaded', or why the kernels are unavailable."""
    if _STATE["module"] is not None:
        return "loaded"
    if _STATE["error"] is not None:
        return str(_STATE["error"])
    return "loading" if _STATE["thread"] is not None else "not loaded"
