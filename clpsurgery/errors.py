"""The one error type clpsurgery raises for bad input: a place and a problem, one line."""

from __future__ import annotations

import os


class SurgeryError(Exception):
    """A problem with a file or an option, printed as `place: problem` on one line."""

    def __init__(self, place: str | os.PathLike[str], problem: str) -> None:
        self.place = os.fspath(place)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.place}: {self.problem}")


class OptionError(SurgeryError):
    """An option's value, or a combination of options, that no input could make right: the command
    line itself is wrong, as in click's own usage errors, so it exits 2 where a file's problem exits 1."""
