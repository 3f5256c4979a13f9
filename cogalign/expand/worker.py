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
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cogalign.errors import RecordError
from cogalign.inputs.images import load_image, load_image_bytes, resolve_image_path, to_working
from cogalign.inputs.embedded import EmbeddedImage
from cogalign.inputs.turns import to_llava
from cogalign.options import ExpandOptions
from cogalign.targets.plan import TurnPlan, plan_turns
from cogalign.inputs.records import check_record
from cogalign.targets.regions import Region
from cogalign.targets.render import px_text, vq_text
from cogalign.targets.splice import make_pair, splice_pairs
from cogalign.targets.templates import TemplateSampler
from cogalign.expand.writer import ROW_GROUP_BYTES, dumps, open_shard

EXPAND, PASS, REJECT = "expand", "pass", "reject"


@dataclass
class WorkerContext:
    """What a worker needs; small and picklable (no model)."""

    options: ExpandOptions
    image_root: Path
    vq_factor: int = 1
    sampler: TemplateSampler = field(default_factory=TemplateSampler)
    decode_only: bool = False  # `validate`: check and decode, compute nothing


@dataclass
class Prepared:
    """One record after `prepare`. `vq_inputs` are uint8 (h, w, 3) arrays to encode."""

    index: int
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
        return self.record.get("id") if isinstance(self.record, dict) else None


def prepare(index: int, record: object, ctx: WorkerContext) -> Prepared:
    """Never raises: any failure becomes a reject that names the cause."""
    if isinstance(record, RecordError):  # the reader could not parse this line
        return Prepared(index, None, REJECT, record.reason, record.detail)
    try:
        return _prepare(index, record, ctx)
    except RecordError as e:
        return Prepared(index, record, REJECT, e.reason, e.detail)
    except Exception as e:  # a bug or an unforeseen decoder failure: keep the run going, keep the evidence
        detail = f"{type(e).__name__}: {e} | " + traceback.format_exc(limit=3).replace("\n", " ")
        return Prepared(index, record, REJECT, "internal_error", detail[:2000])


def _prepare(index: int, record: object, ctx: WorkerContext) -> Prepared:
    return _prepare_llava(index, *to_llava(record), ctx)


def _prepare_llava(index: int, record: object, converted: str, ctx: WorkerContext) -> Prepared:
    opts = ctx.options
    check = check_record(record)
    if check.action == PASS:
        return Prepared(index, record, PASS, check.pass_reason, converted=converted)
    if isinstance(check.image, EmbeddedImage):  # bytes from the input itself, no file
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
    plans = plan_turns(opts.seed, index, check.n_pairs, opts.targets, opts.regions, resolutions,
                       {"vq": ctx.vq_factor, "px": 1}, ctx.sampler)
    by_size = {res: to_working(image, res, opts.resize, opts.resample) for res in {resolutions[k] for k in opts.targets}}
    working = {kind: by_size[resolutions[kind]] for kind in opts.targets}  # one resize per distinct size
    out = Prepared(index, record, EXPAND, plans=plans, warning=warning, converted=converted,
                   image_bytes=(data if isinstance(data, list) else bytes(data)) if opts.embed_images else None)
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
    """The output record: original keys unchanged, new pairs spliced in, `cogalign` provenance."""
    opts = ctx.options
    record = prepared.record
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
    out["cogalign"] = {
        "seed": opts.seed, "index": prepared.index, "turns": turns_meta,
        "tokenizer": opts.tokenizer_name if "vq" in opts.targets else None,
        "tokenizer_hash": opts.tokenizer_hash if "vq" in opts.targets else None,
        "vq_encoder": ({"precision": opts.vq_precision, "layout": "channels_last" if opts.vq_channels_last else
                        "contiguous", "compile": opts.vq_compile} if "vq" in opts.targets else None),
        "vq_scope": opts.vq_scope, "resize": opts.resize, "resample": opts.resample,
        "templates_hash": opts.templates_hash,
    }
    return out


def _turn_meta(plan: TurnPlan, resolution: tuple[int, int]) -> dict:
    region: Region = plan.region
    return {"kind": plan.kind, "region": region.name, "box": list(region.box),
            "template_id": plan.template_id, "position": plan.position,
            "resolution": list(resolution)}


def trim_memory() -> None:
    """Give the memory Python has freed back to the system: glibc keeps megabyte-sized blocks
    (RGB text, row groups) otherwise. ~1 ms; called once per row group, not per record."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class LocalEncoder:
    """Batches VQ crops by shape through the tokenizer in this process (`--workers 0`)."""

    def __init__(self, tokenizer, batch_size: int):
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.groups: dict[tuple, list] = {}  # shape -> [(ticket, slot)]
        self.tickets: dict[int, list] = {}  # ticket -> [inputs, grids, missing]
        self.next = 0

    def submit(self, inputs: list[np.ndarray]) -> int:
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
        return self.tickets[ticket][2] == 0

    def result(self, ticket: int) -> list[np.ndarray]:
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
        out, (self.done, self.expanded) = (self.done, self.expanded), (0, 0)
        return out

    def close(self) -> tuple[Path, dict, list[str], list, float]:
        """Write what is pending and close the file under `.partial/` (the main process publishes it)."""
        self.drain(final=True)
        tmp = self.writer.close_partial()
        return tmp, self.stats, self.rejects, self.ids, time.perf_counter() - self.started

    def abort(self) -> None:
        try:
            self.writer.abort()
        except Exception:  # best effort: the error that got us here is the one to report
            pass
