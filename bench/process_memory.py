"""This process's peak resident memory, for the benchmarks that report memory added."""

from __future__ import annotations

from pathlib import Path


def peak_resident_bytes() -> int:
    """The resident high-water mark of this process image (VmHWM), bytes. ru_maxrss would
    carry the parent's peak over a fork and exec (Linux keeps it), so fresh benchmark
    processes would all report their parent's."""
    status = Path("/proc/self/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1]) * 1024
