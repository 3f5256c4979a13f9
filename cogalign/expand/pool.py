"""An ordered, bounded, crash-tolerant parallel map of `worker.prepare`.

Records go to worker processes in small chunks; results come back in input
order; at most `window` chunks are in flight, so memory stays bounded however
long the input is. A worker that dies (OOM killer, a decoder segfault) breaks
the process pool: the pool is restarted, the records that were in flight are rerun one at a
time, and a record that kills a worker on its own is rejected as
`worker_crashed` instead of stopping the run.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import Iterable, Iterator

from cogalign.errors import CogalignError
from cogalign.expand.worker import REJECT, Prepared, WorkerContext, prepare

__all__ = ["PreparePool", "refuse_while_spawning", "unguarded_main_message", "MAX_CONSECUTIVE_CRASHES",
           "UNGUARDED_EXIT"]

MAX_CONSECUTIVE_CRASHES = 3  # records in a row that kill workers: the workers themselves are broken
UNGUARDED_EXIT = 87  # exit code of a spawned worker that found itself re-running the user's script


def unguarded_main_message() -> str:
    """The one-line error for a script that starts workers without an `if __name__ == "__main__":` guard."""
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None) or "your script"
    return (f"worker processes cannot start: {script} runs cogalign when it is imported, and every worker "
            "process (started with 'spawn') imports it again; put the call under "
            "`if __name__ == \"__main__\":` (see the README, In your own pipeline), or pass workers=0")


def refuse_while_spawning() -> None:
    """Call first in every entry point that starts workers.

    A spawned worker imports the parent's `__main__`; a script without an
    `if __name__ == "__main__":` guard then runs cogalign again inside the worker,
    before the worker has started. Stop that re-run at once, before it touches
    any file, with an exit code the parent recognises.
    """
    if getattr(mp.current_process(), "_inheriting", False):
        raise SystemExit(UNGUARDED_EXIT)


def _noop() -> None:
    pass


def _spawn_probe_exit_code(timeout: float = 120.0) -> int | None:
    """Start one bare spawned process: its exit code tells whether workers can start at all."""
    probe = mp.get_context("spawn").Process(target=_noop, daemon=True)
    probe.start()
    probe.join(timeout)
    if probe.exitcode is None:
        probe.kill()
        probe.join()
    return probe.exitcode

_CTX: WorkerContext | None = None


def _init_worker(ctx: WorkerContext) -> None:
    global _CTX
    _CTX = ctx
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A main process killed with -9 cannot stop its workers: they notice and leave on their own."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _prepare_chunk(chunk: list[tuple[int, object]]) -> list[Prepared]:
    return [prepare(index, record, _CTX) for index, record in chunk]


class PreparePool:
    """`prepare` on `workers` processes (0: in this one), results in input order, a bounded window in flight; a
    record that kills a worker on its own is rejected `worker_crashed`."""

    def __init__(self, ctx: WorkerContext, workers: int, chunk_size: int = 4, window: int | None = None):
        self.ctx, self.workers, self.chunk_size = ctx, workers, chunk_size
        self.window = window or max(2, workers * 3)
        self.restarts = 0
        self._crashed_in_a_row = 0
        self._worked = False  # a worker has returned a result at least once
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> "PreparePool":
        if self.workers > 0:
            self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel=exc[0] is not None)

    def _start(self) -> None:
        refuse_while_spawning()
        self._executor = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self.ctx,))

    def close(self, cancel: bool = False) -> None:
        """Shut the worker processes down (`cancel`: drop what is queued)."""
        if self._executor is not None:
            self._executor.shutdown(wait=not cancel, cancel_futures=cancel)
            self._executor = None

    def map(self, items: Iterable[tuple[int, object]]) -> Iterator[Prepared]:
        """`Prepared` results for `(index, record)` items, in input order."""
        if self.workers == 0:
            for index, record in items:
                yield prepare(index, record, self.ctx)
            return
        source = iter(items)
        suspects: deque = deque()  # records in flight when a worker died: rerun one at a time
        inflight: deque[tuple[object, list]] = deque()

        def broken(*after: list) -> None:
            """The pool died: everything in flight (then `after`) becomes a suspect, in input order."""
            for _, chunk in inflight:
                suspects.extend(chunk)
            for chunk in after:
                suspects.extend(chunk)
            inflight.clear()
            self._restart()

        def top_up() -> None:
            while len(inflight) < self.window and not suspects:
                chunk = list(islice(source, self.chunk_size))
                if not chunk:
                    return
                try:
                    inflight.append((self._executor.submit(_prepare_chunk, chunk), chunk))
                except BrokenProcessPool:  # a worker died while nobody was waiting on it
                    broken(chunk)

        while True:
            if suspects:
                yield from self._isolate(suspects.popleft())
                continue
            top_up()
            if suspects:
                continue
            if not inflight:
                return
            future, chunk = inflight.popleft()
            try:
                results = future.result()
            except BrokenProcessPool:
                inflight.appendleft((future, chunk))
                broken()
                continue
            self._worked = True
            top_up()
            yield from results

    def _isolate(self, item) -> Iterator[Prepared]:
        """Run one suspect alone: if the pool breaks now, this record is the one that kills workers."""
        try:
            results = self._executor.submit(_prepare_chunk, [item]).result()
        except BrokenProcessPool:
            self._restart()
            self._crashed_in_a_row += 1
            index, record = item
            if self._crashed_in_a_row >= MAX_CONSECUTIVE_CRASHES:
                self.close(cancel=True)
                raise CogalignError(f"worker processes died on {self._crashed_in_a_row} records in a row "
                                    f"(last: record {index}); they cannot start or something kills them: "
                                    "rerun with --workers 0 to see the error")
            yield Prepared(index, record, REJECT, "worker_crashed",
                           "the worker process died on this record (out of memory or a decoder crash)")
            return
        self._crashed_in_a_row = 0
        self._worked = True
        yield from results

    def _restart(self) -> None:
        self.close(cancel=True)
        if not self._worked and _spawn_probe_exit_code() == UNGUARDED_EXIT:
            raise CogalignError(unguarded_main_message())
        self.restarts += 1
        self._start()
