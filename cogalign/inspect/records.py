"""Read expanded records back from an output folder, find a record's target turns, and
recompute the regions the targets were made from (from the record's provenance and the
run manifest)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import orjson

from cogalign.errors import CogalignError
from cogalign.expand.layout import read_manifest
from cogalign.options import ExpandOptions
from cogalign.targets.render import RGB_START, VQ_START
from cogalign.expand.writer import IMAGE_BYTES, open_parquet, read_shard, record_of_row
from cogalign.hub.output import images_of

__all__ = ["iter_records", "read_record", "find_record", "locate", "Target", "targets", "working_image",
           "bytes_from_input", "shard_files", "load_manifest"]


def shard_files(out: Path) -> list[Path]:
    """The shard files of an output folder (parquet, then JSON lines), in order; none raises `CogalignError`."""
    files = sorted((Path(out) / "data").glob("train-*.parquet")) + sorted((Path(out) / "data").glob("train-*.jsonl"))
    if not files:
        raise CogalignError(f"{out}: no shards in {Path(out) / 'data'}; is this a cogalign output folder, "
                            "and has `cogalign expand` finished a shard?")
    return files


def iter_records(out: Path) -> Iterator[dict]:
    """Every output record, in shard order."""
    for path in shard_files(out):
        yield from read_shard(path)


def _summaries(path: Path) -> Iterator[tuple[object, dict | None]]:
    """(id, provenance) of each record of a shard, in order, without building the conversations
    (parquet: only the id, cogalign and extra columns are read)."""
    if path.suffix == ".parquet":
        pf = open_parquet(path)
        for batch in pf.iter_batches(batch_size=4096, columns=["id", "cogalign", "extra"]):
            for rid, prov, extra in zip(*(batch.column(c).to_pylist() for c in ("id", "cogalign", "extra"))):
                if rid is None and extra:
                    rid = orjson.loads(extra).get("id")
                yield rid, (orjson.loads(prov) if prov else None)
    else:
        for rec in read_shard(path):
            yield rec.get("id"), rec.get("cogalign")


def read_record(path: Path, row: int) -> dict:
    """Record number `row` of a shard (parquet: only its row group is read; the bytes of an
    embedded image are kept under IMAGE_BYTES, so `show` needs no image files)."""
    if path.suffix == ".parquet":
        pf = open_parquet(path)
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if row < n:
                return record_of_row(pf.read_row_group(rg).slice(row, 1).to_pylist()[0])
            row -= n
        raise IndexError(row)
    for i, rec in enumerate(read_shard(path)):
        if i == row:
            return rec
    raise IndexError(row)


def locate(out: Path, wanted) -> Iterator[tuple[Path, int, object, dict | None]]:
    """(shard, row, id, provenance) of every record for which wanted(id, provenance, position) holds."""
    pos = 0
    for path in shard_files(out):
        for row, (rid, prov) in enumerate(_summaries(path)):
            if wanted(rid, prov, pos):
                yield path, row, rid, prov
            pos += 1


def find_record(out: Path, record_id: str | None = None, index: int | None = None) -> dict:
    """The record with this `id`, or the one at input position `index` (`cogalign.index`,
    or the position in the output for records passed through)."""
    if (record_id is None) == (index is None):
        raise CogalignError("pass exactly one of --id and --index")
    if record_id is not None:
        hits = locate(out, lambda rid, prov, pos: str(rid) == str(record_id))
    else:
        hits = locate(out, lambda rid, prov, pos: (prov or {}).get("index", pos) == index)
    for path, row, _, _ in hits:
        return read_record(path, row)
    what = f"id {record_id!r}" if record_id is not None else f"index {index}"
    unfinished = "" if (Path(out) / "report.json").is_file() else (
        " (report.json is not written: the run, or another slice of it, may not have reached that record yet)")
    raise CogalignError(f"{out}: no record with {what}{unfinished}; rejected records are in rejects.jsonl, "
                        "and --index is the record's position in the input file")


@dataclass
class Target:
    """One added turn: its provenance entry and the gpt answer text."""

    kind: str        # "vq" or "px"
    meta: dict       # region, box, resolution, template_id, position
    answer: str
    question: str = ""


def targets(record: dict) -> list[Target]:
    """The record's added turns, matched to their provenance: new pairs are spliced in order of
    position (stable), so the k-th VQ (RGB) answer in the conversation is the k-th VQ (RGB)
    turn of the provenance sorted by position."""
    prov = record.get("cogalign")
    if not prov:
        raise CogalignError(f"record {record.get('id')!r} was passed through unchanged (no image or not expandable); "
                            "pick an expanded record")
    order = sorted(range(len(prov["turns"])), key=lambda i: prov["turns"][i]["position"])
    answers = {"vq": [], "px": []}
    conv = record["conversations"]
    for i, turn in enumerate(conv):
        value = turn.get("value", "")
        if turn.get("from") == "gpt" and isinstance(value, str):
            question = str(conv[i - 1].get("value", "")) if i else ""
            if value.startswith(VQ_START):
                answers["vq"].append((question, value))
            elif value.startswith(RGB_START):
                answers["px"].append((question, value))
    out, taken = [], {"vq": 0, "px": 0}
    for i in order:
        meta = prov["turns"][i]
        kind = meta["kind"]
        if taken[kind] >= len(answers[kind]):
            raise CogalignError(f"record {record.get('id')!r}: its {kind} answer is missing from the conversation")
        question, answer = answers[kind][taken[kind]]
        out.append(Target(kind, meta, answer, question))
        taken[kind] += 1
    return out


def working_image(record: dict, manifest: dict, resolution: tuple[int, int], image_root: Path | None) -> np.ndarray:
    """The image at a working resolution, resized exactly as `expand` did."""
    from cogalign.errors import RecordError
    from cogalign.inputs.images import load_image, load_image_bytes, resolve_image_path, to_working

    opts = manifest.get("options", {})
    prov = record["cogalign"]
    root = Path(image_root) if image_root else Path(manifest.get("image_root") or Path(manifest["input"]).parent)
    max_pixels = int(opts.get("max_image_pixels") or ExpandOptions.max_image_pixels)
    first = (images_of(record) or [None])[0]  # the targets describe the first image of a list, as expand cut them
    try:
        if record.get(IMAGE_BYTES) and image_root is None:
            image = load_image_bytes(record[IMAGE_BYTES][0], str(first), max_pixels)
        else:
            try:
                path = resolve_image_path(first, root, bool(opts.get("allow_absolute_paths", False)))
                image = load_image(path, max_pixels)
            except RecordError as e:
                data = bytes_from_input(record, manifest) if e.reason == "image_missing" and not image_root else None
                if data is None:
                    raise
                image = load_image_bytes(data, str(first), max_pixels)
    except RecordError as e:
        raise CogalignError(_image_error(e, root, bool(opts.get("allow_absolute_paths", False)))) from None
    return to_working(image, tuple(resolution), prov.get("resize", "stretch"), prov.get("resample", "bicubic"))


def _image_error(e, root: Path, run_allowed_absolute: bool) -> str:
    """One line for an image that `show`/`gallery` cannot read, with the fix these commands offer
    (they have --image-root, not expand's --allow-absolute-paths)."""
    import re

    if e.reason == "image_missing":
        return f"{e} (image root {root}); pass --image-root with the folder the image paths are relative to now"
    if e.reason in ("image_path_escapes_root", "image_path_absolute"):
        detail = re.sub(r" \(pass --allow-absolute-paths[^)]*\)", "", str(e))
        how = "with --allow-absolute-paths" if run_allowed_absolute else "without --allow-absolute-paths"
        return (f"{detail}; the run read images only under its image root ({how}), and so do show and gallery: "
                "pass --image-root with the folder that really holds the images (not a folder of links out of it)")
    return (f"{e} (image root {root}); the run decoded this record's image, so the file found there now is another "
            "one: pass --image-root with the folder the run read, or restore the file")


def bytes_from_input(record: dict, manifest: dict) -> bytes | None:
    """The image bytes a Hub parquet / save_to_disk / mixture input embedded for this record (the
    output keeps only the name unless --embed-images); None for a LLaVA JSON input or one not found."""
    from cogalign.inputs import input_kind, iter_input, reopen_input

    inp, index = Path(str(manifest.get("input") or "")), (record.get("cogalign") or {}).get("index")
    root = Path(str(manifest.get("image_root") or ""))
    # the input path is as the run was given it (maybe relative); its image root is absolute and is
    # the input folder itself, or the folder of an input file
    suffix = inp.suffix.lower()
    if index is None or not str(manifest.get("input") or "") or suffix not in ("", ".parquet", ".yaml", ".yml"):
        return None  # a LLaVA JSON input holds no image bytes
    inp = next((p for p in ((inp, root) if not suffix else (inp, root / inp.name)) if p.exists()), inp)
    try:
        if index is None or not inp.exists() or input_kind(inp) == "llava":
            return None
        seed = int(manifest.get("options", {}).get("seed") or 0)
        for pos, rec in iter_input(reopen_input(manifest, inp), skip=lambda i: i != index, seed=seed):  # its split
            if pos == index:
                return getattr(rec.get("image") if isinstance(rec, dict) else None, "data", None)
    except CogalignError:
        return None
    return None


def load_manifest(out: Path) -> dict:
    """The run manifest (cogalign.json) of an output folder."""
    return read_manifest(Path(out))
