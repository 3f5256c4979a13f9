"""Per-record work, split where the tokenizer sits.

`prepare` runs in a worker process (no torch): check the record, plan its turns,
decode and resize the image, cut the regions, render the RGB text.
`finish` runs in the main process once the VQ indices are known: render the VQ
text, fill the templates, splice the pairs, attach provenance.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cogalign.errors import RecordError
from cogalign.images import load_image, load_image_bytes, resolve_image_path, to_working
from cogalign.inputs.embedded import EmbeddedImage
from cogalign.inputs.turns import to_llava
from cogalign.options import ExpandOptions
from cogalign.plan import TurnPlan, plan_turns
from cogalign.records import check_record
from cogalign.regions import Region
from cogalign.render import px_text, vq_text
from cogalign.splice import make_pair, splice_pairs
from cogalign.templates import TemplateSampler

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
