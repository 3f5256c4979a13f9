"""Run `expand` over a whole input: shards, resume, ranks, and overlapped stages.

Records stream in input order. Worker processes prepare them (decode, crop,
RGB text); the main process batches the VQ inputs through the tokenizer and
finishes each record; one writer thread writes and publishes the shards. The
output depends only on the input and `ExpandOptions`, never on batch size,
worker count, ranks or interruptions.
"""
from __future__ import annotations

import hashlib
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from cogalign import distributed, estimate, report
from cogalign import layout as layout_mod
from cogalign.errors import CogalignError
from cogalign.identity import input_identity
from cogalign.inputs import image_root as resolve_image_root, resolve_input
from cogalign.layout import Layout
from cogalign.options import ExpandOptions
from cogalign.pool import PreparePool, refuse_while_spawning
from cogalign.progress import Progress
from cogalign.records import count_records, iter_records
from cogalign.templates import TemplateSampler
from cogalign.worker import EXPAND, PASS, Prepared, WorkerContext, finish
from cogalign.writer import dumps, open_shard, write_atomic


@dataclass
class Runtime:
    """Knobs that change speed, never the bytes written."""

    batch_size: int = 32
    workers: int = 2
    device: str = "auto"
    shard_size: int | None = None
    overwrite: bool = False
    num_slices: int = 1
    slice_index: int = 0
    progress: bool = True
    trust_pickle: bool = False


@dataclass
class RunResult:
    out_dir: Path
    counts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    warnings: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    shards_skipped: int = 0
    finalized: bool = False
    is_main: bool = True  # the first rank of a torchrun launch: the one that reports
    report: dict | None = None


def resolve_options(options: ExpandOptions, runtime: Runtime, work=None):
    """Load the tokenizer and templates once; fill in their names and hashes."""
    sampler = TemplateSampler.from_path(options.templates)
    tokenizer = None
    if "vq" in options.targets:
        from cogalign.regions import check_regions
        from cogalign.tokenizers import load_tokenizer

        device = distributed.device_for(work or distributed.WorkSlice(), runtime.device)
        tokenizer = load_tokenizer(options.vq, device=device, trust_pickle=runtime.trust_pickle)
        tokenizer.set_encoder_mode(options.vq_precision, options.vq_channels_last, options.vq_compile)
        (h, w), f = options.vq_resolution, tokenizer.downsample
        if h % f or w % f:
            raise CogalignError(f"--vq-resolution {h}x{w} is not a multiple of the tokenizer's "
                                f"downsampling factor {f}; pick e.g. {h - h % f or f}")
        check_regions(options.regions, options.vq_resolution, f, "vq-resolution")
        options = options.replace(tokenizer_name=tokenizer.name, tokenizer_hash=tokenizer.content_hash)
    return options.replace(templates_hash=sampler.content_hash), sampler, tokenizer


def expand(input_path: str | Path, out_dir: str | Path, options: ExpandOptions,
           runtime: Runtime | None = None, image_root: str | Path | None = None) -> RunResult:
    refuse_while_spawning()  # a worker re-running an unguarded script stops here, before touching out_dir
    runtime = runtime or Runtime()
    input_path, out_dir = resolve_input(input_path), Path(out_dir)  # a parquet folder, hf://datasets/...: one split
    image_root = resolve_image_root(input_path, image_root)
    work = distributed.from_env(runtime.num_slices, runtime.slice_index)
    distributed.init_process_group(work)
    try:
        return _expand(input_path, out_dir, options, runtime, image_root, work)
    finally:
        distributed.destroy()


def _expand(input_path, out_dir, options, runtime, image_root, work) -> RunResult:
    started = time.perf_counter()
    options, sampler, tokenizer = resolve_options(options, runtime, work)
    digest = hashlib.sha256()
    n_records = count_records(input_path, digest, seed=options.seed)
    shard_size = runtime.shard_size or estimate.auto_shard_size(options, tokenizer, input_path, image_root)
    layout = Layout(out_dir, max(1, -(-n_records // shard_size)), options.format)  # `[]` still gets one shard
    manifest = {"cogalign_version": _version(), "fingerprint": options.fingerprint(), "options": options.to_dict(),
                "input": str(input_path), "image_root": str(Path(image_root).resolve()),
                "input_identity": input_identity(input_path, digest.hexdigest()),
                "records": n_records, "shard_size": shard_size, "num_shards": layout.num_shards,
                "format": options.format, "owns": layout_mod.owned_files(str(input_path), layout)}
    if work.is_main:  # the first rank decides for its launch; the others check once it has
        layout_mod.prepare(out_dir, manifest, overwrite=runtime.overwrite, sliced=work.num_slices > 1,
                           mine=work.slice_owns)
    distributed.barrier()
    if not work.is_main:
        layout_mod.check(out_dir, manifest)
    layout.make_dirs()
    mine = [s for s in range(layout.num_shards) if work.owns(s)]
    todo = [s for s in mine if not layout.is_complete(s)]
    result = RunResult(out_dir, shards_skipped=len(mine) - len(todo), is_main=work.is_main)
    ctx = WorkerContext(options, image_root, tokenizer.downsample if tokenizer else 1, sampler)
    n_todo = sum(min(shard_size, n_records - s * shard_size) for s in todo)
    with Progress(n_todo, enabled=runtime.progress and work.is_main, label="expand") as bar:
        if todo:
            _run_shards(input_path, layout, shard_size, set(todo), ctx, tokenizer, runtime, result, bar)
    result.seconds = time.perf_counter() - started
    # The first rank reports for the whole launch.
    skipped = Counter(shards=result.shards_skipped)
    result.counts, result.reasons, result.warnings, skipped = distributed.sum_over_ranks(
        [result.counts, result.reasons, result.warnings, skipped])
    result.shards_skipped = skipped["shards"]
    if work.is_main and all(layout.is_complete(s) for s in range(layout.num_shards)):
        try:
            result.report = report.finalize(out_dir)
            result.finalized = True
        except FileNotFoundError:  # another slice's --overwrite is redoing its shards: it reports when done
            pass
    return result


def _run_shards(input_path, layout, shard_size, todo, ctx, tokenizer, runtime, result, bar) -> None:
    sink = ShardSink(layout, ctx.options.format, result, embed_images=ctx.options.embed_images)
    batcher = EncodeBatcher(tokenizer, runtime.batch_size)
    mine = iter_records(input_path, skip=lambda i: i // shard_size not in todo,  # skipped ones never come
                        seed=ctx.options.seed)
    try:
        # Keep two tokenizer batches of records in flight so the encoder never waits on decoding.
        with PreparePool(ctx, runtime.workers, window=max(3 * runtime.workers, runtime.batch_size // 2)) as pool:
            for prepared in pool.map(mine):
                batcher.add(prepared)
                for done, grids in batcher.drain():
                    sink.add(done.index // shard_size, done, grids, ctx)
                    bar.advance(expanded=done.outcome == EXPAND)
            for done, grids in batcher.drain(final=True):
                sink.add(done.index // shard_size, done, grids, ctx)
                bar.advance(expanded=done.outcome == EXPAND)
        for shard in sorted(todo - sink.opened):  # no records (an empty input): an empty shard all the same
            sink.open_empty(shard)
        sink.close()
    except OSError as e:  # disk full, permissions: the finished shards stay valid
        sink.abort()
        raise CogalignError(f"writing {layout.root}: {e}; completed shards are kept, "
                            "fix the cause and rerun the same command to resume") from e
    except BaseException:
        sink.abort()
        raise


class EncodeBatcher:
    """Groups VQ inputs by shape into batches; hands records back in input order."""

    def __init__(self, tokenizer, batch_size: int, max_pending: int = 4096):
        self.tokenizer, self.batch_size, self.max_pending = tokenizer, batch_size, max_pending
        self.pending: deque[list] = deque()  # [prepared, grids, grids missing, inputs] in input order
        self.groups: dict[tuple, list] = {}

    def add(self, prepared: Prepared) -> None:
        inputs, prepared.vq_inputs = prepared.vq_inputs, []  # the batcher holds them now
        entry = [prepared, [None] * len(inputs), len(inputs), inputs]
        self.pending.append(entry)
        for slot, array in enumerate(inputs):
            group = self.groups.setdefault(array.shape, [])
            group.append((entry, slot))
            if len(group) >= self.batch_size:
                self._encode(array.shape)

    def _encode(self, shape) -> None:
        group = self.groups.pop(shape)
        grids = self.tokenizer.encode(np.stack([entry[3][slot] for entry, slot in group]))
        for (entry, slot), grid in zip(group, grids):
            entry[1][slot] = grid
            entry[3][slot] = None
            entry[2] -= 1

    def drain(self, final: bool = False):
        if final or len(self.pending) > self.max_pending:
            for shape in list(self.groups):
                self._encode(shape)
        while self.pending and self.pending[0][2] == 0:
            prepared, grids, _, _ = self.pending.popleft()
            yield prepared, grids


class ShardSink:
    """Routes finished records to their shard's writer. Each shard is written and published by
    a thread of its own, up to `parallel` shards at once: compressing one shard overlaps the
    next (the writer, not the GPU, bounds throughput at the paper's 1.8 MB of text a record)."""

    def __init__(self, layout: Layout, fmt: str, result: RunResult, parallel: int = 4, max_pending: int = 128,
                 embed_images: bool = False):
        self.layout, self.fmt, self.result, self.embed_images = layout, fmt, result, embed_images
        self.parallel, self.max_pending = parallel, max_pending
        self.live: deque[tuple[ThreadPoolExecutor, object]] = deque()  # (thread, last op) per shard
        self.unpublished: dict[int, object] = {}  # shard -> writer, until its publish has run
        self.futures: deque = deque()
        self.shard: int | None = None
        self.opened: set[int] = set()
        self.thread: ThreadPoolExecutor | None = None
        self.writer = None
        self.stats: dict = {}
        self.rejects: list[str] = []
        self.ids: list = []
        self.error: BaseException | None = None

    def add(self, shard: int, prepared: Prepared, grids, ctx: WorkerContext) -> None:
        if shard != self.shard:
            self._close_shard()
            self._open_shard(shard)
        self.stats["input"] += 1
        self.ids.append(prepared.record_id)
        outcome = prepared.outcome
        self.stats[{EXPAND: "expanded", PASS: "passed"}.get(outcome, "rejected")] += 1
        self.result.counts[outcome] += 1
        if prepared.converted:
            self.stats["converted"][prepared.converted] += 1
        if prepared.warning:
            self.stats["warnings"][prepared.warning] += 1
            self.result.warnings[prepared.warning] += 1
        if outcome == EXPAND:
            self._submit(self.writer.write, finish(prepared, grids, ctx), prepared.image_bytes)
        elif outcome == PASS:
            self.stats["pass_reasons"][prepared.reason] += 1
            self._submit(self.writer.write, prepared.record)
        else:
            self.stats["reject_reasons"][prepared.reason] += 1
            self.result.reasons[prepared.reason] += 1
            line = dumps({"index": prepared.index, "id": prepared.record_id, "reason": prepared.reason,
                                 "detail": prepared.detail})
            self.rejects.append(line.decode())  # a str: orjson's bytes keep kilobytes of slack each

    def open_empty(self, shard: int) -> None:
        self._close_shard()
        self._open_shard(shard)

    def _open_shard(self, shard: int) -> None:
        self.opened.add(shard)
        self.shard, self.started = shard, time.perf_counter()
        self.stats = {"shard": shard, "input": 0, "expanded": 0, "passed": 0, "rejected": 0,
                      "pass_reasons": Counter(), "reject_reasons": Counter(), "warnings": Counter(),
                      "converted": Counter()}
        self.rejects, self.ids = [], []
        while len(self.live) >= self.parallel:
            thread, last = self.live.popleft()
            last.result()
            thread.shutdown()
        if self.error is not None:
            raise self.error
        self.thread = ThreadPoolExecutor(1, thread_name_prefix=f"cogalign-writer-{shard}")
        self.writer = self.thread.submit(open_shard, self.layout.shard_path(shard), self.fmt,
                                         self.embed_images).result()
        self.unpublished[shard] = self.writer

    def _submit(self, fn, *args) -> None:
        while self.futures and self.futures[0].done():
            self.futures.popleft().result()  # surfaces a write error (disk full...) here
        if len(self.futures) > self.max_pending:
            self.futures.popleft().result()
        self.futures.append(self.thread.submit(self._guarded, fn, *args))

    def _guarded(self, fn, *args) -> None:
        """In a writer thread: after one failure nothing more is written, above all no shard is published."""
        if self.error is not None:
            return
        try:
            fn(*args)
        except BaseException as e:
            self.error = e
            raise

    def _close_shard(self) -> None:
        if self.shard is None:
            return
        self._submit(self._publish, self.shard, self.writer, self.stats, self.rejects, self.ids,
                     time.perf_counter() - self.started)
        self.live.append((self.thread, self.futures[-1]))
        self.shard = None

    def _publish(self, shard: int, writer, *stats) -> None:
        _publish_shard(self.layout, shard, writer, *stats)
        del self.unpublished[shard]

    def close(self) -> None:
        self._close_shard()
        while self.futures:
            self.futures.popleft().result()
        for thread, _ in self.live:
            thread.shutdown()

    def abort(self) -> None:
        """Leave no partial shard behind; completed shards stay published."""
        for f in self.futures:
            f.cancel()
        for thread in [t for t, _ in self.live] + ([self.thread] if self.shard is not None else []):
            thread.shutdown(wait=True)
        for writer in self.unpublished.values():
            try:
                writer.abort()
            except Exception:  # best effort: the error that got us here is the one to report
                pass


def _publish_shard(layout: Layout, shard: int, writer, stats: dict, rejects: list[str], ids: list,
                   seconds: float) -> None:
    stats["bytes"] = writer.close()
    stats["seconds"] = round(seconds, 3)
    write_atomic(layout.rejects_path(shard), "".join(line + "\n" for line in rejects).encode())
    write_atomic(layout.ids_path(shard), dumps(ids))
    write_atomic(layout.stats_path(shard), orjson.dumps(stats, option=orjson.OPT_INDENT_2))  # the marker


def _version() -> str:
    from cogalign import __version__

    return __version__
