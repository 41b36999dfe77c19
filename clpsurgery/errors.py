"""The one error type clpsurgery raises for bad input: a place and a problem, one line."""

from __future__ import annotations

import os


class SurgeryError(Exception):
    """A problem with a file or an option, printed as `place: problem` on one line."""

    def __init__(self, place: str | os.PathLike[str], problem: str) -> None:
        self.place = os.fspath(place)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.place}: {self.problem}")
