"""What a transfer did, as it runs: seconds per stage, weight and write statistics, hashes and
paths; read by the manifest and the command line."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from clpsurgery.formats.writer import WriteStats

if TYPE_CHECKING:
    from clpsurgery.mixing.weights import WeightStats

ProgressFactory = Callable[[str, int], "contextmanager"]


@contextmanager
def no_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


@dataclass
class TransferResult:
    """What a transfer did, for the report and the manifest."""

    stage_seconds: dict[str, float] = field(default_factory=dict)
    weight_stats: WeightStats | None = None  # set when the rows are written
    head_weight_stats: WeightStats | None = None  # the output side's, where its mixing is its own
    write_stats: WriteStats = field(default_factory=WriteStats)
    zero_helper_rows: int = 0
    config_changes: dict = field(default_factory=dict)
    tensor_hashes: dict[str, dict[str, str]] = field(default_factory=dict)  # file -> rebuilt tensor -> SHA-256
    files: list[str] = field(default_factory=list)
    carried_from_source: list[str] = field(default_factory=list)  # vocabulary-free side files (vocab.source_side_files)
    paths: dict = field(default_factory=dict)  # device, and which search and combine paths ran
    notes: list[str] = field(default_factory=list)  # what a user should hear of the run, a line each
    extension: dict | None = None  # extend: what was appended (extend.extension_summary)


class StageClock:
    """Seconds per stage, where stages may be timed in pieces (reads and combines inside writing)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


