"""A test hook: pause a run at a named point, so that tests can interrupt it exactly there.

`CLPSURGERY_PAUSE_AT=search,combine,copy:3` (any of them, each optionally `:N` for its Nth
arrival, default the first) makes a run, on reaching a listed point, print
`clpsurgery: paused at POINT` on stderr and sleep for `CLPSURGERY_PAUSE_SECONDS` (default 60),
or until the `stop` callable given by the caller says to stop (a background copy being stopped).
The points:

- `search`: the helper vectors are read and normalised, the neighbour search is about to start;
- `combine`: the first block of a rebuilt tensor has been written, the rest are still to come;
- `copy`: a byte copy of an unchanged tensor (or whole file) is about to start;
- `placed`: the output is complete and has just been renamed into place.

Without the variable (always, outside the tests in tests/test_interrupt.py) a call is one dict
lookup. The variable is read once, at import.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

POINTS = ("search", "combine", "copy", "placed")


def _parse(text: str) -> dict[str, int]:
    points = {}
    for item in text.split(","):
        name, _, nth = item.strip().partition(":")
        if name:
            points[name] = int(nth) if nth.isdigit() and int(nth) > 0 else 1
    return points


_PAUSE_AT = _parse(os.environ.get("CLPSURGERY_PAUSE_AT", ""))
_arrivals: dict[str, int] = {}


def reached(point: str, stop: Callable[[], bool] | None = None) -> None:
    """Pause here if the test hook names this point and this is the arrival it names."""
    if point not in _PAUSE_AT:
        return
    _arrivals[point] = _arrivals.get(point, 0) + 1
    if _arrivals[point] != _PAUSE_AT[point]:
        return
    sys.stderr.write(f"clpsurgery: paused at {point} (CLPSURGERY_PAUSE_AT test hook)\n")
    sys.stderr.flush()
    deadline = time.monotonic() + float(os.environ.get("CLPSURGERY_PAUSE_SECONDS", "60"))
    while time.monotonic() < deadline and not (stop is not None and stop()):
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
