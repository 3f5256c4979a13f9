"""A progress bar with records/s, images/s and ETA (rich), silent when disabled."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

console = Console(stderr=True)


class Progress:
    def __init__(self, total: int, enabled: bool = True, label: str = "records"):
        self.total, self.enabled, self.label = total, enabled and total > 0, label
        self.done = self.images = 0
        self.started = time.perf_counter()
        self._bar = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rates]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=console, transient=False,
                disable=not sys.stderr.isatty() and not _force())
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, rates="")
        return self

    def advance(self, expanded: bool = False) -> None:
        self.done += 1
        self.images += expanded
        if self._bar is not None and (self.done % 8 == 0 or self.done == self.total):
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            rates = f"{self.done / elapsed:.1f} rec/s {self.images / elapsed:.1f} img/s"
            self._bar.update(self._task, completed=self.done, rates=rates)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            self._bar.__exit__(*exc)


def _force() -> bool:
    import os

    return os.environ.get("COGALIGN_PROGRESS") == "1"
