"""Min/max-preserving downsampling of a series to a point budget."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Series:
    """One scalar series; min/max are filled only when points were merged."""

    step: list[int] = field(default_factory=list)
    value: list[float | None] = field(default_factory=list)
    min: list[float | None] | None = None
    max: list[float | None] | None = None

    def as_json(self) -> dict[str, list[int] | list[float | None]]:
        """The DESIGN §5.1 shape: step/value, plus min/max when points were merged."""
        out: dict[str, list[int] | list[float | None]] = {"step": self.step, "value": self.value}
        if self.min is not None and self.max is not None:
            out["min"] = self.min
            out["max"] = self.max
        return out


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def downsample(steps: list[int], values: list[float | None], max_points: int) -> Series:
    """Merge consecutive points into at most max_points buckets of equal step width.

    Each bucket reports its last step, the mean of its finite values, and their min and
    max, so a spike survives any budget. A bucket holding only non-finite values reports
    None (JSON null). With no more points than the budget the series is returned as is.
    """
    n = len(steps)
    if n <= max_points:
        return Series(step=list(steps), value=[v if _finite(v) else None for v in values])
    first, last = steps[0], steps[-1]
    width = max(1, math.ceil((last - first + 1) / max_points))
    out = Series(min=[], max=[])
    assert out.min is not None and out.max is not None
    i = 0
    while i < n:
        bucket = (steps[i] - first) // width
        total, count = 0.0, 0
        lo, hi = math.inf, -math.inf
        j = i
        while j < n and (steps[j] - first) // width == bucket:
            v = values[j]
            if v is not None and math.isfinite(v):
                total += v
                count += 1
                lo, hi = min(lo, v), max(hi, v)
            j += 1
        out.step.append(steps[j - 1])
        out.value.append(total / count if count else None)
        out.min.append(lo if count else None)
        out.max.append(hi if count else None)
        i = j
    return out
