"""Shard workers and the one encoder loop that serves them (`expand --workers N`, N >= 1).

Each worker process owns whole shards: it prepares, finishes, serialises and writes
their records (`worker.ShardRun`) under `.partial/`. The main process only reads the
input, hands each shard's records to a worker, batches every worker's VQ crops
through the tokenizer, and publishes finished shards. Crops reach the main process
and indices go back through one shared-memory arena per worker (`multiprocessing.
shared_memory`); only small messages are pickled. A worker that dies has its shards
redone from the records the main process keeps until they are published; a record
that kills a worker twice is rejected as `worker_crashed`.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

from cogalign.errors import CogalignError
from cogalign.expand.pool import (MAX_CONSECUTIVE_CRASHES, UNGUARDED_EXIT, _exit_with_parent, refuse_while_spawning,
                                  unguarded_main_message)

__all__ = ["ShardPool", "ShardInput", "ShmEncoder", "Ring", "Slot", "encode_batch", "return_large_blocks",
           "worker_main"]

HEADER = 64  # arena bytes before the crops: int64 index of the record the worker is on
GRID_DTYPE = np.dtype(np.int64)
CHUNK_RECORDS = 16  # records per message to a worker


def _align(n: int) -> int:
    return (n + 63) // 64 * 64


# ----------------------------------------------------------------------------- worker process

class Ring:
    """First-in first-out allocator over [0, size): a ticket's space is freed in submit order."""

    def __init__(self, size: int):
        self.size, self.head = size, 0
        self.live: deque = deque()  # [ticket, offset, nbytes, freed]

    def alloc(self, ticket: int, n: int) -> int | None:
        """Offset of `n` free bytes for `ticket`, or None until older tickets are freed."""
        if not self.live:
            self.head = 0
        tail = self.live[0][1] if self.live else 0
        if not self.live or self.head > tail:
            if self.size - self.head >= n:
                offset = self.head
            elif n < tail:
                offset = 0
            else:
                return None
        elif self.head + n < tail:
            offset = self.head
        else:
            return None
        self.head = offset + n
        self.live.append([ticket, offset, n, False])
        return offset

    def free(self, ticket: int) -> None:
        """Release `ticket`'s bytes (space is reclaimed in submit order)."""
        for entry in self.live:
            if entry[0] == ticket:
                entry[3] = True
        while self.live and self.live[0][3]:
            self.live.popleft()


class ShmEncoder:
    """The worker's side of the encoder loop: crops into the arena, indices read back from it."""

    def __init__(self, arena: SharedMemory, send, inbox: queue.Queue, backlog: deque, factor: int):
        self.arena, self.send, self.inbox, self.backlog, self.factor = arena, send, inbox, backlog, factor
        self.ring = Ring(arena.size - HEADER)
        self.layout: dict[int, list] = {}  # ticket -> [(offset, grid shape)]
        self.back: set[int] = set()  # tickets whose indices are in the arena
        self.fetched: dict[int, list] = {}  # tickets copied out early to free the arena
        self.next = 0

    def submit(self, inputs: list[np.ndarray]) -> int:
        """Copy a record's crops into the arena and queue them for the encoder; returns the ticket for `result`."""
        ticket, self.next = self.next, self.next + 1
        sizes = [_align(max(a.nbytes, a.shape[0] * a.shape[1] * GRID_DTYPE.itemsize)) for a in inputs]
        while (base := self.ring.alloc(ticket, sum(sizes))) is None:
            if not self.ring.live:
                raise CogalignError(f"a record's VQ crops ({sum(sizes)} bytes) do not fit the worker's "
                                    f"shared memory ({self.ring.size} bytes): raise --memory-budget")
            oldest = self.ring.live[0][0]
            self.fetched[oldest] = self.result(oldest)
        crops, offset = [], base
        for array, size in zip(inputs, sizes):
            np.ndarray(array.shape, np.uint8, self.arena.buf, HEADER + offset)[...] = array
            crops.append((offset, array.shape))
            offset += size
        self.layout[ticket] = crops
        self.send(("vq", ticket, crops))
        return ticket

    def _take(self, block: bool) -> bool:
        """Handle one message from the main process; False if none was waiting."""
        try:
            msg = pickle.loads(self.inbox.get(block=block))
        except queue.Empty:
            return False
        if msg[0] == "idx":
            self.back.update(msg[1])
        else:
            self.backlog.append(msg)
        return True

    def ready(self, ticket: int) -> bool:
        """True when `ticket`'s indices are back (never blocks)."""
        while ticket not in self.back and ticket not in self.fetched and self._take(block=False):
            pass
        return ticket in self.back or ticket in self.fetched

    def result(self, ticket: int) -> list[np.ndarray]:
        """The index grids of `ticket`, waiting for them (and asking the encoder to flush) if needed."""
        if ticket in self.fetched:
            return self.fetched.pop(ticket)
        if not self.ready(ticket):
            self.send(("flush",))  # this worker waits: encode what is batched, full or not
            while ticket not in self.back:
                self._take(block=True)
        self.back.discard(ticket)
        grids = []
        for offset, (h, w, _) in self.layout.pop(ticket):
            shape = (h // self.factor, w // self.factor)
            grids.append(np.ndarray(shape, GRID_DTYPE, self.arena.buf, HEADER + offset).copy())
        self.ring.free(ticket)
        return grids


def encode_batch(tokenizer, batch_size: int) -> int:
    """Crops of one shape gathered before they are encoded. A CPU encoder runs each image alone
    on one thread, `threads` images side by side: more only makes crops, and the records in the
    workers' windows, wait while the encoder idles. A GPU encoder gets the whole --batch-size."""
    if tokenizer is None or str(getattr(tokenizer, "device", "cpu")) != "cpu":
        return batch_size
    import torch

    return max(1, min(batch_size, torch.get_num_threads()))


def return_large_blocks() -> None:
    """In the main process: serve every allocation of 1 MB or more (crop batches, a GPU encoder's
    host buffers) from its own mapping, given back when freed (glibc's moving threshold otherwise
    keeps ~60 MB). Not in the workers: page-faulting each 1.8 MB RGB text anew costs ~6 ms a record;
    nor with a CPU encoder, whose activations it makes 1.5x slower (92 -> 144 ms per 336-px region)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _receive(conn, inbox: queue.Queue) -> None:
    """Drain the pipe from the main process at once, so its sends never wait on this worker's work."""
    try:
        while True:
            inbox.put(conn.recv_bytes())
    except (EOFError, OSError):
        inbox.put(pickle.dumps(("stop",)))


def worker_main(ctx, arena_name: str, window_bytes: int, conn_in, conn_out) -> None:
    """A shard worker's process: runs each shard it is sent with `worker.ShardRun`, crops and indices through the
    shared-memory arena `arena_name`."""
    from cogalign.expand.worker import ShardRun

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    arena = SharedMemory(arena_name)  # the main process owns and unlinks it (one resource tracker for both)
    current = np.ndarray((1,), np.int64, arena.buf, 0)
    inbox: queue.Queue = queue.Queue()
    backlog: deque = deque()
    threading.Thread(target=_receive, args=(conn_in, inbox), daemon=True).start()

    def send(msg) -> None:
        conn_out.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    send(("attached",))  # the main process may drop the arena's name now: a kill -9 leaves nothing in /dev/shm

    encoder = ShmEncoder(arena, send, inbox, backlog, ctx.vq_factor)
    run = None
    try:
        while True:
            msg = backlog.popleft() if backlog else pickle.loads(inbox.get())
            kind = msg[0]
            if kind == "shard":
                _, shard, path, crashed = msg
                run = ShardRun(shard, Path(path), ctx, encoder, window_bytes, crashed)
            elif kind == "recs":
                for index, blob in msg[1]:
                    current[0] = index
                    run.add(index, pickle.loads(blob))
                current[0] = -1
                send(("progress", *run.take_progress()))
            elif kind == "end":
                tmp, stats, rejects, ids, seconds = run.close()
                send(("done", run.shard, str(tmp), stats, rejects, ids, seconds, run.take_progress()))
                run = None
            elif kind == "idx":
                encoder.back.update(msg[1])
            elif kind == "stop":
                return
    except BaseException as e:  # a write error (disk full...): the main process reports it
        if run is not None:
            run.abort()
        try:
            send(("error", e))
        except Exception:
            send(("error", RuntimeError(f"{type(e).__name__}: {e}")))
    finally:
        del current, encoder
        try:
            arena.close()
        except BufferError:
            pass


# ----------------------------------------------------------------------------- main process

@dataclass
class Slot:
    """One worker process: its pipes, its arena, its generation (restarts) and the shards it holds."""
    proc: object
    to_worker: object
    from_worker: object
    arena: SharedMemory
    gen: int
    shards: deque = field(default_factory=deque)
    unlinked: bool = False  # the arena's name is gone (the mapping lives until both processes close it)


@dataclass
class ShardInput:
    """The pickled records of one shard, kept until the shard is published so a dead worker's shard can be redone."""
    slot: int
    records: list = field(default_factory=list)  # (index, pickled record): kept until published
    nbytes: int = 0
    ended: bool = False


class ShardPool:
    """Runs shards on `workers` processes; `on_done(shard, tmp, stats, rejects, ids, seconds)`
    publishes one, `on_progress(done, expanded)` counts records. `budget` (bytes) bounds the
    records held for redo, each worker's window of records awaiting indices, and its arena."""

    def __init__(self, ctx, workers: int, tokenizer, batch_size: int, budget: int, shard_path,
                 on_done, on_progress, max_crop_bytes: int = 0):
        self.ctx, self.workers, self.tokenizer, self.batch_size = ctx, workers, tokenizer, batch_size
        self.shard_path, self.on_done, self.on_progress = shard_path, on_done, on_progress
        self.input_budget = budget // 16
        self.encode_batch = encode_batch(tokenizer, batch_size)
        # a CPU encoder takes a crop per thread and its activations share host memory: half the window
        cpu_encoder = tokenizer is not None and str(getattr(tokenizer, "device", "cpu")) == "cpu"
        self.window_bytes = max(budget // ((32 if cpu_encoder else 16) * workers), 1 << 20)
        self.arena_bytes = HEADER + _align(max(self.window_bytes, 4 * max_crop_bytes, 1 << 20))
        self.slots: list[Slot] = []
        self.shards: dict[int, ShardInput] = {}
        self.groups: dict[tuple, list] = {}  # crop shape -> [(slot, gen, ticket, offset)]
        self.missing: dict[tuple, int] = {}  # (slot, gen, ticket) -> crops not yet encoded
        self.crashes: Counter = Counter()  # record index -> workers it killed
        self.crashed_in_a_row = 0
        self.crashed_between_records = 0  # since a shard was last published: deaths no record can be blamed for
        self.held = 0  # bytes of records kept for redo
        self.received = 0  # bytes of messages that reached this process
        self.restarts = 0
        self._gen = 0
        self._mp = mp.get_context("spawn")

    # -- processes
    def __enter__(self) -> "ShardPool":
        refuse_while_spawning()
        if self.tokenizer is None or str(getattr(self.tokenizer, "device", "cpu")) != "cpu":
            return_large_blocks()
        self.slots = [self._start(i) for i in range(self.workers)]
        return self

    def _start(self, i: int, shards: deque | None = None) -> Slot:
        self._gen += 1
        arena = SharedMemory(create=True, size=self.arena_bytes)
        np.ndarray((1,), np.int64, arena.buf, 0)[0] = -1
        from_main, to_worker = self._mp.Pipe(duplex=False)
        from_worker, to_main = self._mp.Pipe(duplex=False)
        proc = self._mp.Process(target=worker_main, daemon=True, name=f"cogalign-shard-worker-{i}",
                                args=(self.ctx, arena.name, self.window_bytes, from_main, to_main))
        proc.start()
        from_main.close()
        to_main.close()
        return Slot(proc, to_worker, from_worker, arena, self._gen, shards or deque())

    def __exit__(self, exc_type, *exc) -> None:
        for slot in self.slots:
            if exc_type is None:
                self._send(slot, ("stop",))
        for slot in self.slots:
            if exc_type is not None:
                slot.proc.kill()
            slot.proc.join(timeout=60)
            if slot.proc.exitcode is None:
                slot.proc.kill()
                slot.proc.join()
            self._close(slot)

    @staticmethod
    def _close(slot: Slot) -> None:
        slot.to_worker.close()
        slot.from_worker.close()
        slot.arena.close()
        ShardPool._unlink(slot)

    @staticmethod
    def _unlink(slot: Slot) -> None:
        if not slot.unlinked:
            slot.arena.unlink()
            slot.unlinked = True

    def _send(self, slot: Slot, msg) -> None:
        try:
            slot.to_worker.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
        except (BrokenPipeError, OSError):
            pass  # it died: its sentinel says so and `_crashed` redoes its shards

    # -- feeding
    def run(self, records, shard_size: int, todo: set[int]) -> None:
        """Feed `records` (index, record) to the workers shard by shard (`index // shard_size`) and encode their
        crops until every shard in `todo` is published."""
        current, chunk = None, []
        source = iter(records)
        exhausted = False
        while not exhausted or self.shards:
            while not exhausted and self._can_read(current):
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                index, record = item
                shard = index // shard_size
                if shard != current:
                    self._flush(current, chunk)
                    chunk = []
                    self._end(current)
                    self._open(shard)
                    todo.discard(shard)
                    current = shard
                blob = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
                chunk.append((index, blob))
                self.shards[shard].records.append((index, blob))
                self.shards[shard].nbytes += len(blob)
                self.held += len(blob)
                if len(chunk) >= CHUNK_RECORDS:
                    self._flush(current, chunk)
                    chunk = []
                    break  # serve the workers between chunks
            if exhausted:
                self._flush(current, chunk)
                chunk = []
                self._end(current)
                current = None
                for shard in sorted(todo):  # no records (an empty input): an empty shard all the same
                    self._open(shard)
                    self._end(shard)
                todo.clear()
            self._serve(block=exhausted or not self._can_read(current))

    def _can_read(self, current) -> bool:
        """Within the budget; or the shard being read is the only one open (it must be read whole)."""
        return self.held < self.input_budget or list(self.shards) in ([], [current])

    def _open(self, shard: int) -> None:
        slot = min(range(len(self.slots)), key=lambda i: len(self.slots[i].shards))
        self.shards[shard] = ShardInput(slot)
        self.slots[slot].shards.append(shard)
        self._send(self.slots[slot], ("shard", shard, str(self.shard_path(shard)), self._rejected()))

    def _rejected(self) -> frozenset:
        return frozenset(i for i, n in self.crashes.items() if n >= 2)

    def _flush(self, shard, chunk) -> None:
        if chunk:
            self._send(self.slots[self.shards[shard].slot], ("recs", chunk))

    def _end(self, shard) -> None:
        if shard is not None and shard in self.shards:
            self.shards[shard].ended = True
            self._send(self.slots[self.shards[shard].slot], ("end",))

    # -- serving
    def _serve(self, block: bool) -> None:
        conns = {slot.from_worker: i for i, slot in enumerate(self.slots)}
        sentinels = {slot.proc.sentinel: i for i, slot in enumerate(self.slots)}
        ready = wait(list(conns) + list(sentinels), timeout=None if block else 0)
        touched = sorted({conns[o] if o in conns else sentinels[o] for o in ready})
        dead = [i for i in touched if self.slots[i].proc.sentinel in ready]
        for i in touched:
            conn, messages = self.slots[i].from_worker, []
            try:
                while conn.poll():  # what it sent before it died still counts (a shard it finished)
                    data = conn.recv_bytes()
                    self.received += len(data)
                    messages.append(pickle.loads(data))
            except (EOFError, OSError):  # the pipe broke: the worker died
                if i not in dead:
                    dead.append(i)
            for msg in messages:  # outside the try: an OSError a worker reports (disk full) is the run's error
                self._handle(i, msg)
        for i in dead:
            self._crashed(i)

    def _handle(self, i: int, msg) -> None:
        kind, slot = msg[0], self.slots[i]
        if kind == "attached":
            self._unlink(slot)
        elif kind == "vq":
            _, ticket, crops = msg
            self.missing[(i, slot.gen, ticket)] = len(crops)
            for offset, shape in crops:
                group = self.groups.setdefault(tuple(shape), [])
                group.append((i, slot.gen, ticket, offset))
                if len(group) >= self.encode_batch:
                    self._encode(tuple(shape))
        elif kind == "flush":
            for shape in list(self.groups):
                self._encode(shape)
        elif kind == "progress":
            self._progress(msg[1:])
        elif kind == "done":
            _, shard, tmp, stats, rejects, ids, seconds, progress = msg
            self._progress(progress)
            record = self.shards.pop(shard)
            self.crashed_between_records = 0
            self.held -= record.nbytes
            slot.shards.remove(shard)
            self.on_done(shard, Path(tmp), stats, rejects, ids, seconds)
        elif kind == "error":
            raise msg[1]

    def _progress(self, progress) -> None:
        done, expanded = progress
        if done:
            self.crashed_in_a_row = 0
            self.on_progress(done, expanded)

    def _encode(self, shape: tuple) -> None:
        group = self.groups.pop(shape)
        batch = np.stack([np.ndarray(shape, np.uint8, self.slots[i].arena.buf, HEADER + offset)
                          for i, _, _, offset in group])
        grids = self.tokenizer.encode(batch)
        for (i, gen, ticket, offset), grid in zip(group, grids):
            slot = self.slots[i]
            np.ndarray(grid.shape, GRID_DTYPE, slot.arena.buf, HEADER + offset)[...] = grid
            key = (i, gen, ticket)
            self.missing[key] -= 1
            if not self.missing[key]:
                del self.missing[key]
                self._send(slot, ("idx", [ticket]))

    def _crashed(self, i: int) -> None:
        """A worker died: blame the record it was on, start another, redo its shards."""
        slot = self.slots[i]
        slot.proc.join(timeout=5)
        if slot.proc.exitcode == UNGUARDED_EXIT:
            raise CogalignError(unguarded_main_message())
        culprit = int(np.ndarray((1,), np.int64, slot.arena.buf, 0)[0])
        self.crashed_in_a_row += 1
        if self.crashed_in_a_row > 2 * MAX_CONSECUTIVE_CRASHES:
            raise CogalignError(f"worker processes died {self.crashed_in_a_row} times in a row (last: record "
                                f"{culprit}); they cannot start or something kills them: rerun with --workers 0 "
                                "to see the error")
        if culprit >= 0:
            self.crashes[culprit] += 1
        else:  # closing a shard (compressing it): redoing the shard would die there again, for ever
            self.crashed_between_records += 1
            if self.crashed_between_records > MAX_CONSECUTIVE_CRASHES:
                raise CogalignError(f"worker processes died {self.crashed_between_records} times while writing a "
                                    f"shard, not on a record (out of memory?): lower --shard-size or --workers, "
                                    "or rerun with --workers 0 to see the error")
        for shape in list(self.groups):  # its crops died with it
            self.groups[shape] = [g for g in self.groups[shape] if g[:2] != (i, slot.gen)]
            if not self.groups[shape]:
                del self.groups[shape]
        self.missing = {k: v for k, v in self.missing.items() if k[:2] != (i, slot.gen)}
        self._close(slot)
        self.restarts += 1
        self.slots[i] = new = self._start(i, slot.shards)
        for shard in new.shards:
            self._send(new, ("shard", shard, str(self.shard_path(shard)), self._rejected()))
            records = self.shards[shard].records
            for start in range(0, len(records), CHUNK_RECORDS):
                self._send(new, ("recs", records[start:start + CHUNK_RECORDS]))
            if self.shards[shard].ended:
                self._send(new, ("end",))
