"""How a side study (a script outside `make experiments`) states its command and writes its
report: the exact command line heads the report, which is printed and, with --out, saved."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


def finish(module: str, argv: list[str] | None, out: str | None, make: Callable[[str], str]) -> int:
    """Print the report ``make`` writes for this command line (and save it to ``out``);
    returns the exit status 0. Called once the study's runs are done."""
    args = argv if argv is not None else sys.argv[1:]
    text = make(" ".join(["python -m", module, *args]))
    print(text)
    if out:
        Path(out).write_text(text)
    return 0
