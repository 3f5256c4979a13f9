"""`validate` and `--dry-run`: the checks of `expand` without computing targets."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from cogalign.expand import estimate
from cogalign.errors import CogalignError, RecordError
from cogalign.inputs import count_input, image_root as resolve_image_root, iter_input, resolve_input
from cogalign.inputs.turns import to_llava
from cogalign.options import ExpandOptions
from cogalign.expand.pool import PreparePool, refuse_while_spawning
from cogalign.expand.progress import Progress
from cogalign.inputs.records import check_record
from cogalign.targets.render import VQ_START
from cogalign.expand.worker import EXPAND, WorkerContext, finish, prepare
from cogalign.expand.writer import dumps

__all__ = ["Validation", "validate", "check_rejects_dest", "dry_run", "startup_estimate", "sample_turns", "load_llm_tokenizer",
           "open_output"]


@dataclass
class Validation:
    """Counts of a `validate` run: outcomes, reject, pass and warning reasons, seconds."""
    counts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    pass_reasons: Counter = field(default_factory=Counter)
    warnings: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no record was rejected."""
        return self.counts["reject"] == 0


def validate(input_path: str | Path, options: ExpandOptions, image_root: str | Path | None = None,
             workers: int = 2, rejects_path: str | Path | None = None, progress: bool = True) -> Validation:
    """Check every record and decode every image, in worker processes; write rejects as JSON lines."""
    refuse_while_spawning()
    input_path = resolve_input(input_path)
    ctx = WorkerContext(options, resolve_image_root(input_path, image_root), decode_only=True)
    result, started = Validation(), time.perf_counter()
    if rejects_path and Path(rejects_path).exists() and Path(rejects_path).resolve() == Path(str(input_path)).resolve():
        raise CogalignError(f"--rejects {rejects_path} is the input file; writing it would erase the input: "
                            "give another path")
    if rejects_path:
        check_rejects_dest(Path(rejects_path))
    out = open_output(rejects_path, "--rejects") if rejects_path else None
    try:
        with Progress(count_input(input_path, seed=options.seed), enabled=progress, label="validate") as bar, \
                PreparePool(ctx, workers, chunk_size=16) as pool:
            for p in pool.map(iter_input(input_path, seed=options.seed)):
                result.counts[p.outcome] += 1
                if p.warning:
                    result.warnings[p.warning] += 1
                if p.outcome == "reject":
                    result.reasons[p.reason] += 1
                    if out:
                        out.write(dumps({"index": p.index, "id": p.record_id, "reason": p.reason,
                                         "detail": p.detail}) + b"\n")
                elif p.outcome == "pass":
                    result.pass_reasons[p.reason] += 1
                bar.advance(expanded=p.outcome == EXPAND)
    finally:
        if out:
            out.close()
    result.seconds = time.perf_counter() - started
    return result


REJECT_KEYS = {"index", "id", "reason", "detail"}


def check_rejects_dest(path: Path) -> None:
    """Refuse an existing --rejects file that no `validate` wrote (an image, the user's notes...): only an
    empty file or an earlier rejects list (JSON lines of index/id/reason/detail) is replaced."""
    if not path.is_file():
        return
    try:
        with open(path, "rb") as f:
            ours = all(set(orjson.loads(line)) == REJECT_KEYS for line in f if line.strip())
    except (ValueError, TypeError, OSError):
        ours = False
    if not ours:
        raise CogalignError(f"--rejects {path}: exists and is not a rejects list that validate wrote; validate never "
                            "replaces another file: give a new path (or an earlier --rejects file)")


def open_output(path: str | Path, option: str):
    """Open a file for writing, creating its folder; a path that cannot be written is one CogalignError."""
    path = Path(path)
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise CogalignError(f"{option} {path}: {parent} is a file, not a folder; give another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "wb")
    except OSError as e:
        raise CogalignError(f"{option} {path}: cannot write this file ({e.strerror or e}); "
                            "give a file path in a folder you can write to") from None


def dry_run(input_path: str | Path, options: ExpandOptions, tokenizer=None, sampler=None,
            image_root: str | Path | None = None, llm_tokenizer=None, samples: int = 8,
            timings: dict | None = None, skip=None, shard_size: int | None = None, encode: bool = True) -> dict:
    """Counts from the record checks alone, the new turns of a few real records (built and
    measured, see `sample_turns`) and from both the size of what expand would write.
    `timings`, if given, gets the seconds per sampled record spent in a worker (writing included) and in
    the encoder;
    `skip(position)` leaves records out (a slice's start-up estimate reads only its own);
    `encode=False`: the VQ answers from indices of the right count, see `sample_turns`."""
    from cogalign.targets.templates import TemplateSampler

    counts, reasons, sizes = Counter(), Counter(), Counter()
    passed: list = []
    for _, record in iter_input(input_path, seed=options.seed, skip=skip):
        try:
            if isinstance(record, RecordError):
                raise record
            record = to_llava(record)[0]
            action = check_record(record).action
        except RecordError as e:
            counts["reject"] += 1
            reasons[e.reason] += 1
            continue
        counts[action] += 1
        sizes[action] += len(dumps(record)) + 1
        if action == "pass" and len(passed) < 64:
            passed.append(record)
    facts, built = sample_turns(input_path, options, sampler or TemplateSampler.from_path(options.templates),
                               tokenizer, image_root, llm_tokenizer, samples, keep=True, timings=timings, skip=skip,
                               encode=encode)
    if timings is not None and built["expanded"]:  # the worker also serialises and compresses each record
        timings["worker"] = timings.get("worker", 0.0) + estimate.write_seconds(
            built["expanded"], options.format, built.get("images"))
    shard_size = shard_size or estimate.auto_shard_size(options, tokenizer, input_path, image_root)
    n = sum(counts.values())
    if built["expanded"] or not counts["expand"]:
        total = estimate.output_bytes(options.format, expand=counts["expand"], passed=counts["pass"],
                                      expand_input_bytes=sizes["expand"], passed_input_bytes=sizes["pass"],
                                      samples={**built, "passed": passed}, shards=max(1, -(-n // shard_size)))
    else:  # no record could be built (every image bad?): the text-length model, uncompressed
        total = sizes["expand"] + sizes["pass"] + counts["expand"] * estimate.record_bytes(options, tokenizer)
    return {"records": n, "would_expand": counts["expand"], "would_pass": counts["pass"],
            "rejected_by_shape": counts["reject"], "reject_reasons": dict(reasons),
            "target_chars": estimate.target_chars(options, tokenizer), "estimated_output_bytes": total,
            "shard_size": shard_size, **facts}


def load_llm_tokenizer(path: str | Path):
    """A Hugging Face fast tokenizer (`tokenizer.json`, or a folder holding one), via `tokenizers`."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise CogalignError("--llm-tokenizer needs the `tokenizers` package: pip install tokenizers") from None
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise CogalignError(f"{file}: no tokenizer.json there; pass the file (or folder) of a Hugging Face fast tokenizer")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:
        raise CogalignError(f"{file}: not a tokenizer.json the `tokenizers` package can read ({e})") from None


def sample_turns(input_path: str | Path, options: ExpandOptions, sampler, tokenizer, image_root: str | Path | None,
                 llm_tokenizer=None, samples: int = 8, keep: bool = False, timings: dict | None = None,
                 skip=None, encode: bool = True):
    """Build the new turns of the first `samples` expandable records for real and measure them:
    characters and, given an LLM tokenizer, tokens (what `model_max_length` truncates silently).
    With `keep`, also return the records built: {"expanded": [...], "expanded_input": [...]}.
    `encode=False` (expand's start-up estimate): no tokenizer call; each crop gets indices uniform
    over the codebook (the VQ text's expected length) and the encoder's time is counted from its
    FLOPs (`estimate.encoder_seconds`)."""
    input_path = resolve_input(input_path)
    ctx = WorkerContext.for_tokenizer(options, resolve_image_root(input_path, image_root), tokenizer, sampler)
    sizes: dict[str, list[tuple[int, int]]] = {kind: [] for kind in options.targets}
    done = 0
    built = {"expanded": [], "expanded_input": [], "images": [] if options.embed_images else None}
    clock = Counter()
    for index, record in iter_input(input_path, seed=options.seed, skip=skip):
        if done >= samples:
            break
        started = time.perf_counter()
        prepared = prepare(index, record, ctx)
        if prepared.outcome != EXPAND:
            continue
        encoding = time.perf_counter()
        if not prepared.vq_inputs:
            grids = []
        elif encode or not hasattr(tokenizer, "flops"):
            grids = list(tokenizer.encode(np.stack(prepared.vq_inputs)))
        else:
            f, shapes = tokenizer.downsample, [a.shape for a in prepared.vq_inputs]
            grids = [estimate.synthetic_grid(s, f, tokenizer.codebook_size, index) for s in shapes]
            clock["encoder"] += estimate.encoder_seconds(tokenizer, shapes)  # counted, not spent
        record = prepared.record  # in LLaVA's turns
        original = {id(t) for t in record["conversations"]}
        finishing = time.perf_counter()
        finished = finish(prepared, grids, ctx)
        clock["worker"] += time.perf_counter() - finishing + encoding - started
        if encode or not hasattr(tokenizer, "flops"):
            clock["encoder"] += finishing - encoding
        if keep:
            built["expanded"].append(finished)
            built["expanded_input"].append(record)
            if options.embed_images:
                built["images"].append(prepared.image_bytes)
        new = [t["value"] for t in finished["conversations"] if id(t) not in original]
        for question, answer in zip(new[::2], new[1::2]):
            kind = "vq" if answer.startswith(VQ_START) else "px"
            text = question + answer
            tokens = len(llm_tokenizer.encode(text, add_special_tokens=False).ids) if llm_tokenizer else 0
            sizes[kind].append((len(text), tokens))
        done += 1
    out = {"sampled_records": done}
    if timings is not None:
        timings.update({k: v / max(done, 1) for k, v in clock.items()})
    for kind, values in sizes.items():
        if values:
            out[f"{kind}_turn_chars_mean"] = round(sum(c for c, _ in values) / len(values))
            if llm_tokenizer is not None:
                out[f"{kind}_turn_tokens_mean"] = round(sum(t for _, t in values) / len(values))
                out[f"{kind}_turn_tokens_max"] = max(t for _, t in values)
    return (out, built) if keep else out


def startup_estimate(input_path: str | Path, options: ExpandOptions, tokenizer, sampler,
                     image_root: str | Path | None, workers: int, samples: int = 3, skip=None,
                     shard_size: int | None = None) -> tuple[int, float, dict]:
    """What `expand` prints before it starts: the `--dry-run` estimate of the output bytes and
    of the run's seconds (a worker's and the encoder's time per sampled record; the slower
    of the workers together and the encoder sets the pace). Fewer samples than --dry-run's 8:
    at the paper's settings each holds megabytes of text in the main process. `skip`: the records
    this run does not do (another slice's, or done), never read (a Hub input downloads no file for them)."""
    timings: dict = {}
    facts = dry_run(input_path, options, tokenizer, sampler, image_root, samples=samples, timings=timings, skip=skip,
                    shard_size=shard_size, encode=False)
    worker, encoder = timings.get("worker", 0.0), timings.get("encoder", 0.0)
    per_record = worker + encoder if workers == 0 else max(worker / workers, encoder)
    return facts["estimated_output_bytes"], facts["would_expand"] * per_record, facts
