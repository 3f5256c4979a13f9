"""Run `expand` over a whole input: shards, resume, ranks, and overlapped stages.

Records stream in input order. Each shard is one worker process's whole job
(shardpool.py): decode, crop, RGB text, templates, splicing and writing under
`.partial/`. The main process reads the input, batches every worker's VQ crops
through the tokenizer (crops and indices in shared memory) and publishes finished
shards (rename, then the stats marker). The output depends only on the input and
`ExpandOptions`, never on batch size, worker count, ranks or interruptions.
"""
from __future__ import annotations

import hashlib
import operator
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from cogalign.expand import distributed, estimate, report, validate
from cogalign.expand import layout as layout_mod
from cogalign.errors import CogalignError, OptionError, cli_flag, python_wording
from cogalign.expand.identity import input_identity
from cogalign.inputs import count_input, image_root as resolve_image_root, iter_input, resolve_input
from cogalign.expand.layout import Layout
from cogalign.options import ExpandOptions, check_bools
from cogalign.expand import writer as writer_mod
from cogalign.expand.pool import refuse_while_spawning
from cogalign.expand.progress import Progress
from cogalign.expand.shardpool import ShardPool
from cogalign.targets.templates import TemplateSampler
from cogalign.expand.worker import EXPAND, PASS, REJECT, LocalEncoder, ShardRun, WorkerContext, trim_memory
from cogalign.expand.writer import dumps, write_atomic

__all__ = ["expand", "Runtime", "RunResult", "resolve_options"]


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
    memory_budget: int = estimate.DEFAULT_MEMORY_BUDGET  # bytes for the queues and buffers between stages
    ignore_disk_space: bool = False

    def __post_init__(self) -> None:
        """Refuse a bad value here, in one line naming it (the CLI's ranges), not as a traceback mid-run."""
        if isinstance(self.memory_budget, str):  # the CLI's "512MB"
            try:
                self.memory_budget = estimate.parse_size(self.memory_budget)
            except ValueError as e:
                raise OptionError(f"--memory-budget {e}") from None
        for name, low, high in (("batch_size", 1, 4096), ("workers", 0, 1024), ("shard_size", 1, 2**63 - 1),
                                ("memory_budget", 1, 2**63 - 1)):
            value = getattr(self, name)
            if value is None and name == "shard_size":
                continue
            try:
                number = operator.index(value)  # numpy integers too, not floats or strings
            except TypeError:
                number = low - 1
            if isinstance(value, bool) or not low <= number <= high:
                raise OptionError(f"{cli_flag(name)} {value!r}: an integer from {low} to {high}")
            setattr(self, name, number)
        check_bools(self, ("overwrite", "progress", "trust_pickle", "ignore_disk_space"))


@dataclass
class RunResult:
    """What `expand()` did in this process: record counts, reject and warning reasons, time, shards skipped on
    resume, and the merged report once the run is finalized."""
    out_dir: Path
    counts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    warnings: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    shards_skipped: int = 0
    finalized: bool = False
    is_main: bool = True  # the first rank of a torchrun launch: the one that reports
    report: dict | None = None
    main_received_bytes: int = 0  # what the shard workers sent this process (crops travel in shared memory)
    worker_restarts: int = 0


def resolve_options(options: ExpandOptions, runtime: Runtime, work=None):
    """Load the tokenizer and templates once; fill in their names and hashes."""
    sampler = TemplateSampler.from_path(options.templates)
    tokenizer = None
    if "vq" in options.targets:
        from cogalign.targets.regions import check_regions
        from cogalign.tokenizers import load_tokenizer

        device = distributed.device_for(work or distributed.WorkSlice(), runtime.device)
        try:
            tokenizer = load_tokenizer(options.vq, device=device, trust_pickle=runtime.trust_pickle)
            tokenizer.set_encoder_mode(options.vq_precision, options.vq_channels_last, options.vq_compile)
        except CogalignError as e:  # worded with flags: from Python, name the parameters (the CLI keeps the flags)
            if getattr(e, "cli_message", None) or python_wording(str(e)) == str(e):
                raise
            worded = type(e)(python_wording(str(e)))
            worded.cli_message = str(e)
            raise worded from None
        (h, w), f = options.vq_resolution, tokenizer.downsample
        if h % f or w % f:
            raise OptionError(f"--vq-resolution {h}x{w} is not a multiple of the tokenizer's "
                                f"downsampling factor {f}; pick e.g. {h - h % f or f}")
        check_regions(options.regions, options.vq_resolution, f, "vq-resolution")
        if getattr(tokenizer, "params", None):  # a taming model: refuse a size beyond memory before allocating
            from cogalign.tokenizers.taming import check_fits_memory

            try:
                check_fits_memory(tokenizer.params, h, w, "--vq-resolution")
            except CogalignError as e:  # an option's fault: worded for the caller (Python or CLI)
                raise OptionError(str(e)) from None
        if options.tokenizer_hash and options.tokenizer_hash != tokenizer.content_hash:  # pinned (a run's cogalign.json)
            raise OptionError(f"tokenizer_hash={options.tokenizer_hash!r}, but {options.vq} has content hash "
                              f"{tokenizer.content_hash}: give the tokenizer the options were made with")
        options = options.replace(tokenizer_name=tokenizer.name, tokenizer_hash=tokenizer.content_hash)
    if options.templates_hash and options.templates_hash != sampler.content_hash:
        raise OptionError(f"templates_hash={options.templates_hash!r}, but the templates {options.templates or '(built in)'} "
                          f"have content hash {sampler.content_hash}: give the templates the options were made with")
    return options.replace(templates_hash=sampler.content_hash), sampler, tokenizer


def expand(input_path: str | Path, out_dir: str | Path, options: ExpandOptions,
           runtime: Runtime | None = None, image_root: str | Path | None = None) -> RunResult:
    """Expand every record of `input_path` into `out_dir` (resuming a matching run there) and return the counts;
    the output bytes depend only on the input and `options`, never on `runtime`."""
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
    n_records = count_input(input_path, digest, seed=options.seed)
    shard_size = runtime.shard_size or estimate.auto_shard_size(options, tokenizer, input_path, image_root)
    layout = Layout(out_dir, max(1, -(-n_records // shard_size)), options.format)  # `[]` still gets one shard
    manifest = {"cogalign_version": _version(), "fingerprint": options.fingerprint(), "options": options.to_dict(),
                "input": str(input_path), "image_root": str(Path(image_root).resolve()),
                "input_identity": input_identity(input_path, digest.hexdigest()),
                "records": n_records, "shard_size": shard_size, "num_shards": layout.num_shards,
                "format": options.format, "owns": layout_mod.owned_files(str(input_path), layout)}
    mine = [s for s in range(layout.num_shards) if work.owns(s)]
    planned = [s for s in mine if runtime.overwrite or not layout.is_complete(s)]
    startup = _check_disk(input_path, out_dir, options, sampler, tokenizer, image_root, runtime,
                          n_records, set(planned), shard_size)
    if work.is_main:  # the first rank decides for its launch; the others check once it has
        layout_mod.prepare(out_dir, manifest, overwrite=runtime.overwrite, sliced=work.num_slices > 1,
                           mine=work.slice_owns)
    distributed.barrier()
    if not work.is_main:
        layout_mod.check(out_dir, manifest)
    else:
        print(startup, file=sys.stderr, flush=True)
    layout.make_dirs()
    todo = [s for s in mine if not layout.is_complete(s)]
    result = RunResult(out_dir, shards_skipped=len(mine) - len(todo), is_main=work.is_main)
    ctx = WorkerContext.for_tokenizer(options, image_root, tokenizer, sampler)
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


def _check_disk(input_path, out_dir, options, sampler, tokenizer, image_root, runtime, n_records: int,
                planned: set, shard_size: int) -> str:
    """Refuse a run that cannot fit; return the start-up line (records, estimated size and time, free space).
    The estimate reads only the planned shards' records (a slice or rank downloads nothing else)."""
    if not planned:
        return f"expand: all {n_records} records of this run are done"
    need, seconds, facts = validate.startup_estimate(input_path, options, tokenizer, sampler, image_root,
                                                     runtime.workers, skip=lambda i: i // shard_size not in planned,
                                                     shard_size=shard_size)
    _release_freed_memory()  # the sample records' megabytes of text, before the long run starts
    n_planned = facts["records"]
    where = next(p for p in [out_dir, *out_dir.parents] if p.exists())
    free = shutil.disk_usage(where).free
    if need > free and not runtime.ignore_disk_space:
        raise OptionError(f"--out {out_dir}: the output needs about {estimate.human_bytes(need)} but only "
                            f"{estimate.human_bytes(free)} is free there; shrink it with --px-resolution (e.g. 32) "
                            "or --targets vq, free some space, or pass --ignore-disk-space")
    return (f"expand: {n_planned} of {n_records} records to do; estimated output {estimate.human_bytes(need)}, "
            f"about {_duration(seconds)} with {runtime.workers} worker{'s' if runtime.workers != 1 else ''} after start-up; {estimate.human_bytes(free)} free at {where}")


def _release_freed_memory() -> None:
    import gc

    gc.collect()
    trim_memory()


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _run_shards(input_path, layout, shard_size, todo, ctx, tokenizer, runtime, result, bar) -> None:
    mine = iter_input(input_path, skip=lambda i: i // shard_size not in todo,  # skipped ones never come
                        seed=ctx.options.seed)

    def publish(shard: int, tmp: Path, stats: dict, rejects: list[str], ids: list, seconds: float) -> None:
        _publish_shard(layout, shard, tmp, stats, rejects, ids, seconds)
        result.counts.update({EXPAND: stats["expanded"], PASS: stats["passed"], REJECT: stats["rejected"]})
        result.reasons.update(stats["reject_reasons"])
        result.warnings.update(stats["warnings"])

    try:
        if runtime.workers == 0:
            _run_in_process(mine, layout, shard_size, set(todo), ctx, tokenizer, runtime, publish, bar)
        else:
            crop = estimate.vq_crop_bytes(ctx.options) if tokenizer is not None else 0
            with ShardPool(ctx, runtime.workers, tokenizer, runtime.batch_size, runtime.memory_budget,
                           layout.shard_path, publish, bar.add, max_crop_bytes=crop) as pool:
                pool.run(mine, shard_size, set(todo))
            result.main_received_bytes = pool.received
            result.worker_restarts = pool.restarts
    except OSError as e:  # disk full, permissions: the finished shards stay valid
        _remove_partials(layout, todo)
        raise CogalignError(f"writing {layout.root}: {e}; completed shards are kept, "
                            "fix the cause and rerun the same command to resume") from e
    except BaseException:
        _remove_partials(layout, todo)
        raise


def _run_in_process(mine, layout, shard_size, todo, ctx, tokenizer, runtime, publish, bar) -> None:
    """`--workers 0`: the same shard runs, one after another, with the tokenizer in this process."""
    encoder = LocalEncoder(tokenizer, runtime.batch_size)
    window = max(runtime.memory_budget // 16, 1 << 20)  # as one shard worker's
    run = None
    try:
        for index, record in mine:
            shard = index // shard_size
            if run is not None and run.shard != shard:
                _close_run(run, publish, bar)
                run = None
            if run is None:
                todo.discard(shard)
                run = ShardRun(shard, layout.shard_path(shard), ctx, encoder, window)
            run.add(index, record)
            bar.add(*run.take_progress())
        if run is not None:
            _close_run(run, publish, bar)
            run = None
        for shard in sorted(todo):  # no records (an empty input): an empty shard all the same
            run = ShardRun(shard, layout.shard_path(shard), ctx, encoder, window)
            _close_run(run, publish, bar)
            run = None
    finally:
        if run is not None:
            run.abort()


def _close_run(run: ShardRun, publish, bar) -> None:
    tmp, stats, rejects, ids, seconds = run.close()
    bar.add(*run.take_progress())
    publish(run.shard, tmp, stats, rejects, ids, seconds)


def _remove_partials(layout: Layout, shards) -> None:
    """Leave no partial shard behind (the workers are gone); completed shards stay published."""
    for shard in shards:
        layout.partial_path(shard).unlink(missing_ok=True)


def _publish_shard(layout: Layout, shard: int, tmp: Path, stats: dict, rejects: list[str], ids: list,
                   seconds: float) -> None:
    """Rename the finished file into data/, then write the shard's stats (its completion marker)."""
    stats["bytes"] = writer_mod._publish(tmp, layout.shard_path(shard))
    stats["seconds"] = round(seconds, 3)
    write_atomic(layout.rejects_path(shard), "".join(line + "\n" for line in rejects).encode())
    write_atomic(layout.ids_path(shard), dumps(ids))
    write_atomic(layout.stats_path(shard), orjson.dumps(stats, option=orjson.OPT_INDENT_2))  # the marker


def _version() -> str:
    from cogalign import __version__

    return __version__
