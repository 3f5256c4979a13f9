"""Per-record and per-shard work, split where the tokenizer sits.

`prepare` (check the record, plan its turns, decode and resize the image, cut the
regions, render the RGB text) and `finish` (render the VQ text once the indices are
known, fill the templates, splice the pairs, attach provenance) run in a worker
process (no torch); `ShardRun` drives both over one shard's records in order and
writes the shard under `.partial/`. Only the VQ crops leave the worker, through an
`encoder` (in-process: `LocalEncoder`; in a worker: shared memory, see shardpool.py).
"""
from __future__ import annotations

import ctypes
import sys
import time
import traceback
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cogalign.errors import CogalignError, RecordError
from cogalign.inputs.images import load_image, load_image_bytes, load_image_object, resolve_image_path, to_working
from cogalign.inputs.embedded import EmbeddedImage
from cogalign.inputs.turns import to_llava
from cogalign.options import ExpandOptions
from cogalign.targets.plan import TurnPlan, plan_turns
from cogalign.inputs.records import check_record, choice_index
from cogalign.targets.regions import Region
from cogalign.targets.render import px_text, vq_text
from cogalign.targets.splice import make_pair, splice_pairs
from cogalign.targets.templates import TemplateSampler
from cogalign.expand.writer import ROW_GROUP_BYTES, dumps, open_shard

__all__ = ["EXPAND", "PASS", "REJECT", "IMAGE_GIVEN", "check_given", "tokenizer_identity", "WorkerContext", "Prepared", "prepare",
           "vq_grids", "finish", "trim_memory", "LocalEncoder", "ShardRun"]

EXPAND, PASS, REJECT = "expand", "pass", "reject"


def tokenizer_identity(tokenizer) -> dict:
    """What provenance says about the tokenizer that encodes: name, content hash and encoder mode
    (precision, layout, compile), read from the tokenizer object itself."""
    return {"name": tokenizer.name, "content_hash": tokenizer.content_hash, **tokenizer.encoder_mode()}


@dataclass
class WorkerContext:
    """What a worker needs; small and picklable (no model). With VQ targets, build it with
    `for_tokenizer` (the VQ boxes are aligned to the tokenizer's factor, and the provenance
    names that tokenizer and its encoder mode); `sampler` defaults to `options.templates`."""

    options: ExpandOptions
    image_root: Path
    vq_factor: int | None = None  # the tokenizer's downsampling factor (VQ targets)
    sampler: TemplateSampler | None = None
    decode_only: bool = False  # `validate`: check and decode, compute nothing
    tokenizer: dict | None = None  # `tokenizer_identity` of the tokenizer that encodes (VQ targets)

    def __post_init__(self) -> None:
        if self.sampler is None:
            self.sampler = TemplateSampler.from_path(self.options.templates)
        if "vq" in self.options.targets and not self.decode_only and (self.vq_factor is None or self.tokenizer is None):
            raise CogalignError("WorkerContext: VQ targets need the tokenizer's factor and identity; build it with "
                                "WorkerContext.for_tokenizer(options, image_root, tokenizer)")

    @classmethod
    def for_tokenizer(cls, options: ExpandOptions, image_root, tokenizer=None,
                      sampler: TemplateSampler | None = None) -> "WorkerContext":
        """The context for `options` with `tokenizer` (None without VQ targets): its factor and identity."""
        if tokenizer is None:
            return cls(options, Path(image_root), None, sampler)
        return cls(options, Path(image_root), int(tokenizer.downsample), sampler,
                   tokenizer=tokenizer_identity(tokenizer))


@dataclass
class Prepared:
    """One record after `prepare`. `vq_inputs` are uint8 (h, w, 3) arrays to encode."""

    index: int  # the record's position in the input
    record: object
    outcome: str
    reason: str = ""
    detail: str = ""
    plans: list[TurnPlan] = field(default_factory=list)
    vq_inputs: list[np.ndarray] = field(default_factory=list)
    px_texts: list[str] = field(default_factory=list)
    warning: str = ""  # kept, but LLaVA's trainer would mistreat it (counted in report.json)
    image_bytes: bytes | list[bytes] | None = None  # the image files' bytes, with --embed-images (a list: several images)
    converted: str = ""  # the record's turns were converted to LLaVA's (counted in report.json)

    @property
    def record_id(self):
        """The record's `id` (None when it has none or is not an object)."""
        return self.record.get("id") if isinstance(self.record, dict) else None


def prepare(index: int, record: object, ctx: WorkerContext, image=None) -> Prepared:
    """Never raises: any failure becomes a reject that names the cause. `record` may be any
    Mapping (a `datasets` row); it is read as a dict. `image`, if given, is the record's (first)
    image in memory or by path (`images.load_image_object`), used instead of its `image` value."""
    if isinstance(record, Mapping) and not isinstance(record, dict):
        record = dict(record)
    if isinstance(record, RecordError):  # the reader could not parse this line
        return Prepared(index, None, REJECT, record.reason, record.detail)
    try:
        return _prepare_llava(index, *to_llava(record), ctx, image)
    except RecordError as e:
        return Prepared(index, record, REJECT, e.reason, e.detail)
    except Exception as e:  # a bug or an unforeseen decoder failure: keep the run going, keep the evidence
        detail = f"{type(e).__name__}: {e} | " + traceback.format_exc(limit=3).replace("\n", " ")
        return Prepared(index, record, REJECT, "internal_error", detail[:2000])


IMAGE_GIVEN = "<image given>"  # what a record's `image` is checked as when the caller gives the image itself


def check_given(record: object, given=None):
    """`check_record`, with the pixels of the record's first image `given` by the caller: the record's
    `image` value (a path, or one held in memory) is checked as a path would be. A record with no
    `image` (text-only, video) is checked as it is: a given image never makes it an image record."""
    value = record.get("image") if isinstance(record, dict) else None
    if given is None or value is None:
        return check_record(record)
    if isinstance(value, list):  # several images: the first is given, the others stay as they are
        stand_in = [IMAGE_GIVEN, *(v if isinstance(v, str) else IMAGE_GIVEN for v in value[1:])] if value else value
    else:
        stand_in = IMAGE_GIVEN
    return check_record({**record, "image": stand_in})


def _prepare_llava(index: int, record: object, converted: str, ctx: WorkerContext, given=None) -> Prepared:
    opts = ctx.options
    check = check_given(record, given)
    if check.action == PASS:
        return Prepared(index, record, PASS, check.pass_reason, converted=converted)
    if record.get("cogalign") is not None and not ctx.decode_only:  # new provenance would hide the old turns
        raise RecordError("already_expanded", "the record already holds cogalign turns (it has `cogalign` "
                          "provenance): expand the original input instead, with every target at once")
    if given is not None:
        name = record.get("image") if isinstance(record.get("image"), str) else f"the image of record {index}"
        image, data = load_image_object(given, name, opts.max_image_pixels, ctx.image_root, opts.allow_absolute_paths,
                                        read_bytes=opts.embed_images)
    elif isinstance(check.image, EmbeddedImage):  # bytes from the input itself, no file
        data = check.image.data
        image = load_image_bytes(data, check.image, opts.max_image_pixels)
    else:
        path = resolve_image_path(check.image, ctx.image_root, opts.allow_absolute_paths)
        image = load_image(path, opts.max_image_pixels)
        data = path.read_bytes() if opts.embed_images else None
    if opts.embed_images and isinstance(record.get("image"), list) and len(record["image"]) > 1:
        data = [data, *(_image_data(item, ctx) for item in record["image"][1:])]  # every image is kept
    warning = check.warning
    if ctx.decode_only:
        return Prepared(index, record, EXPAND, warning=warning, converted=converted)
    resolutions = {"vq": opts.vq_resolution, "px": opts.px_resolution}
    plans = plan_turns(opts.seed, choice_index(record, index), check.n_pairs, opts.targets, opts.regions, resolutions,
                       {"vq": ctx.vq_factor, "px": 1}, ctx.sampler)
    by_size = {res: to_working(image, res, opts.resize, opts.resample) for res in {resolutions[k] for k in opts.targets}}
    working = {kind: by_size[resolutions[kind]] for kind in opts.targets}  # one resize per distinct size
    out = Prepared(index, record, EXPAND, plans=plans, warning=warning, converted=converted,
                   image_bytes=(data if isinstance(data, list) else bytes(data)) if opts.embed_images and data is not None
                   else None)
    for plan in plans:
        if plan.kind == "px":
            out.px_texts.append(px_text(plan.region.crop(working["px"])))
        elif opts.vq_scope == "region":
            out.vq_inputs.append(np.ascontiguousarray(plan.region.crop(working["vq"])))
    if opts.vq_scope == "image" and "vq" in opts.targets:
        out.vq_inputs.append(working["vq"])
    return out


def _image_data(image, ctx: WorkerContext) -> bytes:
    """The bytes of one more image of a record (--embed-images), checked as the first one was."""
    if isinstance(image, EmbeddedImage):
        load_image_bytes(image.data, image, ctx.options.max_image_pixels)
        return bytes(image.data)
    path = resolve_image_path(image, ctx.image_root, ctx.options.allow_absolute_paths)
    load_image(path, ctx.options.max_image_pixels)
    return path.read_bytes()


def vq_grids(prepared: Prepared, encoded: list[np.ndarray], factor: int, scope: str) -> list[np.ndarray]:
    """Index grid of each VQ plan: the region's own encoding, or a slice of the whole image's."""
    if scope == "region":
        return list(encoded)
    full = encoded[0]
    return [full[p.region.box[1] // factor:p.region.box[3] // factor,
                 p.region.box[0] // factor:p.region.box[2] // factor] for p in prepared.plans if p.kind == "vq"]


def finish(prepared: Prepared, encoded: list[np.ndarray], ctx: WorkerContext) -> dict:
    """The output record: original keys unchanged, new pairs spliced in, `cogalign` provenance
    (from the context's tokenizer identity and templates). A record `prepare` passed comes back
    as `expand` writes it (no provenance); a rejected one raises its `RecordError`."""
    if prepared.outcome == PASS:
        return prepared.record
    if prepared.outcome != EXPAND:
        raise RecordError(prepared.reason, prepared.detail)
    if ctx.decode_only:
        raise CogalignError("finish: a decode-only context (validate) computes no turns")
    opts = ctx.options
    record = prepared.record
    if sum(p.kind == "vq" for p in prepared.plans) and len(encoded) != (
            1 if opts.vq_scope == "image" else sum(p.kind == "vq" for p in prepared.plans)):
        raise CogalignError(f"finish: record {prepared.index} needs the indices of each of its VQ crops, got {len(encoded)}")
    grids = iter(vq_grids(prepared, encoded, ctx.vq_factor, opts.vq_scope))
    px_texts = iter(prepared.px_texts)
    inserts, turns_meta = [], []
    for plan in prepared.plans:
        resolution = opts.vq_resolution if plan.kind == "vq" else opts.px_resolution
        if plan.kind == "vq":
            grid = next(grids)
            answer, length = vq_text(grid), int(grid.size)
        else:
            answer, length = next(px_texts), None
        question = ctx.sampler.fill(plan.kind, plan.template_id, plan.region, resolution, length)
        human, gpt = make_pair(question, answer, check_answer=False)
        inserts.append((plan.position, human, gpt))
        turns_meta.append(_turn_meta(plan, resolution))
    out = dict(record)
    out["conversations"] = splice_pairs(record["conversations"], inserts)
    vq = "vq" in opts.targets
    tok = ctx.tokenizer or {}
    out["cogalign"] = {
        "seed": opts.seed, "index": prepared.index, "turns": turns_meta,
        "tokenizer": tok.get("name") if vq else None,
        "tokenizer_hash": tok.get("content_hash") if vq else None,
        "vq_encoder": ({k: tok.get(k) for k in ("precision", "layout", "compile")} if vq else None),
        "vq_scope": opts.vq_scope, "resize": opts.resize, "resample": opts.resample,
        "templates_hash": ctx.sampler.content_hash,
    }
    return out


def _turn_meta(plan: TurnPlan, resolution: tuple[int, int]) -> dict:
    region: Region = plan.region
    return {"kind": plan.kind, "region": region.name, "box": list(region.box),
            "template_id": plan.template_id, "position": plan.position,
            "resolution": list(resolution)}


def trim_memory() -> None:
    """Give the memory Python has freed back to the system: glibc keeps megabyte-sized blocks
    (RGB text, row groups) otherwise, and pyarrow's allocator the ~3x a row group it took to
    compress one. ~1 ms; called once per row group (and after the start-up estimate), not per record."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    pyarrow = sys.modules.get("pyarrow")
    if pyarrow is not None:
        pyarrow.default_memory_pool().release_unused()


class LocalEncoder:
    """Batches VQ crops by shape through the tokenizer in this process (`--workers 0`)."""

    def __init__(self, tokenizer, batch_size: int):
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.groups: dict[tuple, list] = {}  # shape -> [(ticket, slot)]
        self.tickets: dict[int, list] = {}  # ticket -> [inputs, grids, missing]
        self.next = 0

    def submit(self, inputs: list[np.ndarray]) -> int:
        """Queue one record's crops; a ticket for `result`. A shape's batch is encoded once full."""
        ticket, self.next = self.next, self.next + 1
        self.tickets[ticket] = [list(inputs), [None] * len(inputs), len(inputs)]
        for slot, array in enumerate(inputs):
            group = self.groups.setdefault(array.shape, [])
            group.append((ticket, slot))
            if len(group) >= self.batch_size:
                self._encode(array.shape)
        return ticket

    def _encode(self, shape) -> None:
        group = self.groups.pop(shape)
        grids = self.tokenizer.encode(np.stack([self.tickets[t][0][slot] for t, slot in group]))
        for (t, slot), grid in zip(group, grids):
            entry = self.tickets[t]
            entry[0][slot], entry[1][slot] = None, grid
            entry[2] -= 1

    def ready(self, ticket: int) -> bool:
        """Whether every crop of this ticket has its indices."""
        return self.tickets[ticket][2] == 0

    def result(self, ticket: int) -> list[np.ndarray]:
        """The ticket's index grids, in submit order (encoding what is queued if they are not all in)."""
        if not self.ready(ticket):
            for shape in list(self.groups):
                self._encode(shape)
        return self.tickets.pop(ticket)[1]


class ShardRun:
    """One shard's records in input order: prepared, encoded, finished and written under
    `.partial/`. Records wait for their indices in a window of at most `window_bytes`
    (RGB text and crops). `crashed` holds records rejected for killing a worker twice."""

    def __init__(self, shard: int, path: Path, ctx: WorkerContext, encoder, window_bytes: int,
                 crashed: frozenset = frozenset()):
        self.shard, self.ctx, self.encoder, self.window_bytes, self.crashed = shard, ctx, encoder, window_bytes, crashed
        self.started = time.perf_counter()
        self.writer = open_shard(path, ctx.options.format, ctx.options.embed_images)
        self.stats = {"shard": shard, "input": 0, "expanded": 0, "passed": 0, "rejected": 0,
                      "pass_reasons": Counter(), "reject_reasons": Counter(), "warnings": Counter(),
                      "converted": Counter()}
        self.rejects: list[str] = []
        self.ids: list = []
        self.pending: deque = deque()  # (prepared, ticket or None, bytes), input order
        self.pending_bytes = 0
        self.done = self.expanded = 0  # records written, since the last `take_progress`
        self.written = 0  # bytes of text handed to the writer, to give memory back once per row group
        self.current = -1  # the record being worked on (a worker crash is blamed on it)

    def add(self, index: int, record: object) -> None:
        """Prepare the record at input position `index`, send its crops to the encoder, write what is ready."""
        self.current = index
        if index in self.crashed:
            prepared = Prepared(index, record, REJECT, "worker_crashed",
                                "the worker process died on this record twice (out of memory or a decoder crash)")
        else:
            prepared = prepare(index, record, self.ctx)
        ticket = None
        if prepared.outcome == EXPAND and prepared.vq_inputs:
            ticket = self.encoder.submit(prepared.vq_inputs)
        size = sum(map(len, prepared.px_texts)) + sum(a.nbytes for a in prepared.vq_inputs) + len(prepared.image_bytes or b"")
        prepared.vq_inputs = []
        self.pending.append((prepared, ticket, size))
        self.pending_bytes += size
        self.drain()

    def drain(self, final: bool = False) -> None:
        """Finish and write the records at the head whose indices are back (all of them if `final`,
        enough to fall under the window if it is full)."""
        while self.pending:
            prepared, ticket, size = self.pending[0]
            must = final or self.pending_bytes > self.window_bytes
            if ticket is not None and not must and not self.encoder.ready(ticket):
                return
            self.pending.popleft()
            self.pending_bytes -= size
            grids = self.encoder.result(ticket) if ticket is not None else []
            self._write(prepared, grids)

    def _write(self, prepared: Prepared, grids) -> None:
        self.current = prepared.index
        stats = self.stats
        stats["input"] += 1
        self.ids.append(prepared.record_id)
        outcome = prepared.outcome
        stats[{EXPAND: "expanded", PASS: "passed"}.get(outcome, "rejected")] += 1
        if prepared.converted:
            stats["converted"][prepared.converted] += 1
        if prepared.warning:
            stats["warnings"][prepared.warning] += 1
        if outcome == EXPAND:
            record = finish(prepared, grids, self.ctx)
            self.writer.write(record, prepared.image_bytes)
            before, self.written = self.written, self.written + sum(map(len, prepared.px_texts))
            if before // ROW_GROUP_BYTES != self.written // ROW_GROUP_BYTES:
                trim_memory()
        elif outcome == PASS:
            stats["pass_reasons"][prepared.reason] += 1
            self.writer.write(prepared.record)
        else:
            stats["reject_reasons"][prepared.reason] += 1
            line = dumps({"index": prepared.index, "id": prepared.record_id, "reason": prepared.reason,
                          "detail": prepared.detail})
            self.rejects.append(line.decode())  # a str: orjson's bytes keep kilobytes of slack each
        self.done += 1
        self.expanded += outcome == EXPAND
        self.current = -1

    def take_progress(self) -> tuple[int, int]:
        """(records written, of them expanded) since the last call."""
        out, (self.done, self.expanded) = (self.done, self.expanded), (0, 0)
        return out

    def close(self) -> tuple[Path, dict, list[str], list, float]:
        """Write what is pending and close the file under `.partial/` (the main process publishes it)."""
        self.drain(final=True)
        tmp = self.writer.close_partial()
        return tmp, self.stats, self.rejects, self.ids, time.perf_counter() - self.started

    def abort(self) -> None:
        """Drop the file under `.partial/` (best effort)."""
        try:
            self.writer.abort()
        except Exception:  # best effort: the error that got us here is the one to report
            pass
