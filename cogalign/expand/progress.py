"""Progress with records/s, images/s and ETA: a rich bar on a terminal, a log line every 30 s elsewhere."""
from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

__all__ = ["Progress", "LOG_EVERY_S"]

LOG_EVERY_S = 30.0


class Progress:
    """Progress of a run: a rich bar on a terminal (records/s, images/s, ETA), else a log line every
    `LOG_EVERY_S` seconds; a context manager."""

    def __init__(self, total: int, enabled: bool = True, label: str = "records"):
        self.total, self.enabled, self.label = total, enabled and total > 0, label
        self.done = self.images = self._shown = 0
        self.started = self._logged = time.perf_counter()
        self._bar = None
        self._tty = sys.stderr.isatty() or os.environ.get("COGALIGN_PROGRESS") == "bar"

    def __enter__(self) -> "Progress":
        if self.enabled and self._tty:
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rates]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=Console(stderr=True))
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, rates="")
        return self

    def rates(self) -> str:
        """Records and images per second so far."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return f"{self.done / elapsed:.1f} rec/s {self.images / elapsed:.1f} img/s"

    def advance(self, expanded: bool = False) -> None:
        """Count one record (`expanded`: it got new turns, so an image)."""
        self.add(1, int(expanded))

    def add(self, done: int, expanded: int = 0) -> None:
        """`done` more records, `expanded` of them with an image."""
        if not done:
            return
        self.done += done
        self.images += expanded
        if not self.enabled:
            return
        if self._bar is not None:
            if self.done - self._shown >= 8 or self.done == self.total:
                self._shown = self.done
                self._bar.update(self._task, completed=self.done, rates=self.rates())
        elif time.perf_counter() - self._logged >= LOG_EVERY_S:
            self._logged = time.perf_counter()
            elapsed = self._logged - self.started
            eta = (self.total - self.done) * elapsed / self.done
            print(f"{self.label}: {self.done}/{self.total} {self.rates()} ETA {eta:.0f} s", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rates=self.rates())
            self._bar.__exit__(*exc)
