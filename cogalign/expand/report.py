"""Merge per-shard stats into report.json, rejects.jsonl and the dataset card; print the summary.

Everything written here is derived from the shards' stats files, so it is the
same whichever rank, slice or rerun writes it (`cogalign merge-report OUT`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import orjson

from cogalign.expand.layout import CARD, CARD_COPY, Layout, card_is_ours, merged_name, read_manifest, write_card
from cogalign.expand.writer import dumps, open_parquet, temp_name, write_atomic
from cogalign.inputs.records import loads_exact

__all__ = ["finalize", "summary_lines", "report_counts", "top_reasons", "dataset_card", "card_note", "dangling_note",
           "shareable_options", "source_dataset", "source_label", "arrow_bytes", "COUNTS"]

COUNTS = ("input", "expanded", "passed", "rejected")


def finalize(out_dir: str | Path) -> dict:
    """Write OUT/report.json, OUT/rejects.jsonl, the dataset card (OUT/README.md unless that is
    someone else's, see `layout.write_card`) and the merged LLaVA file for json/jsonl."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir, run=True)
    layout = Layout(out_dir, manifest["num_shards"], manifest["format"])
    missing = [i for i in range(layout.num_shards) if not layout.is_complete(i)]
    if missing:
        raise FileNotFoundError(f"{out_dir}: {len(missing)} of {layout.num_shards} shards are not complete yet "
                                f"(first: {missing[0]}); run the remaining slices, then merge-report again")
    totals, pass_reasons, reject_reasons, warnings, output_bytes = Counter(), Counter(), Counter(), Counter(), 0
    converted: Counter = Counter()  # records whose chat-format turns became LLaVA's
    ids: Counter = Counter()
    tmp = temp_name(out_dir / "rejects.jsonl")
    with _removed_on_error(tmp), open(tmp, "wb") as rejects:
        for i in range(layout.num_shards):
            stats = orjson.loads(layout.stats_path(i).read_bytes())
            totals.update({k: stats[k] for k in COUNTS})
            pass_reasons.update(stats["pass_reasons"])
            reject_reasons.update(stats["reject_reasons"])
            warnings.update(stats.get("warnings", {}))
            converted.update(stats.get("converted", {}))
            output_bytes += stats["bytes"]
            with open(layout.rejects_path(i), "rb") as f:
                shutil.copyfileobj(f, rejects)
            ids.update(dumps(x).decode() for x in loads_exact(layout.ids_path(i).read_bytes()) if x is not None)
    tmp.replace(out_dir / "rejects.jsonl")
    duplicates = {k: n for k, n in ids.items() if n > 1}
    report = {
        **{k: totals[k] for k in COUNTS},
        "pass_reasons": dict(sorted(pass_reasons.items())),
        "reject_reasons": dict(reject_reasons.most_common()),
        "warnings": dict(sorted(warnings.items())),  # expanded all the same; LLaVA would mistreat them
        "converted": dict(sorted(converted.items())),  # role/content or messages records, now from/value
        "duplicate_ids": {"ids": len(duplicates), "records": sum(duplicates.values()),
                          "examples": [loads_exact(k) for k in sorted(duplicates)[:10]]},
        "shards": layout.num_shards, "format": layout.fmt, "output_bytes": output_bytes,
        "arrow_bytes": arrow_bytes(layout),
        "fingerprint": manifest["fingerprint"], "options": shareable_options(manifest["options"]),
    }
    assert totals["input"] == manifest["records"], "every input record is accounted for"
    write_atomic(out_dir / "report.json", _indented(report))
    if layout.fmt in ("json", "jsonl"):
        _merge_llava_file(layout, merged_name(manifest["input"], layout.fmt))
    write_card(out_dir, dataset_card(report, manifest).encode())
    try:
        (out_dir / ".partial").rmdir()  # only if empty
    except OSError:
        pass
    return report


def arrow_bytes(layout: Layout) -> int | None:
    """The records' size in Arrow, what `datasets` reports as a split's `num_bytes` (recorded in each
    parquet shard's footer by the writer); None for JSON lines, whose Arrow types `datasets` infers."""
    if layout.fmt != "parquet":
        return None
    from cogalign.expand.writer import ARROW_BYTES_KEY

    total = 0
    for i in range(layout.num_shards):
        shard = open_parquet(layout.shard_path(i))
        recorded = (shard.metadata.metadata or {}).get(ARROW_BYTES_KEY.encode())
        total += int(recorded) if recorded else sum(b.nbytes for b in shard.iter_batches())  # an older shard
    return total


def shareable_options(options: dict) -> dict:
    """The options with local paths (the tokenizer folder, the templates file) cut to their names:
    report.json goes to the Hub with `publish`; cogalign.json keeps the paths."""
    def name(value):
        return Path(value).name if isinstance(value, str) and os.path.isabs(value) else value
    return {k: name(v) for k, v in options.items()}


def source_dataset(manifest: dict) -> str | None:
    """OWNER/NAME when the input was a Hub dataset: `hf://datasets/OWNER/NAME...` as the input, or the
    `repo` its input identity records."""
    import re

    identity = manifest.get("input_identity") if isinstance(manifest.get("input_identity"), dict) else {}
    for value in (manifest.get("input"), identity.get("path")):
        found = re.match(r"^hf://datasets/([\w.-]+/[\w.-]+?)(?:@|/|$)", value) if isinstance(value, str) else None
        if found:
            return found.group(1)
    repo = identity.get("repo")
    return repo if isinstance(repo, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", repo) else None


def source_label(manifest: dict) -> str:
    """The input as the card names it: a Hub dataset at its commit (with its PATH), a local input by its
    file or folder name; then the config and split read (the output's one split is `train` whichever it was)."""
    identity = manifest.get("input_identity") if isinstance(manifest.get("input_identity"), dict) else {}
    name = Path(str(manifest["input"])).name
    if str(manifest["input"]).startswith("hf://datasets/") and isinstance(identity.get("commit"), str):
        from cogalign.inputs.hub import DatasetSpec, parse

        spec = parse(str(manifest["input"]))
        name = str(DatasetSpec(spec.repo_id, identity["commit"][:12], spec.path))
    parts = [f"{k} {identity[k]}" for k in ("config", "split") if isinstance(identity.get(k), str) and identity[k]]
    moved = identity.get("split") not in (None, "", "train")  # the output names its split `train`
    return f"`{name}`" + (f" ({', '.join(parts)}{'; here its `train` split' if moved else ''})" if parts else "")


def card_note(out_dir: str | Path) -> str:
    """Lines for the summary: image paths that point nowhere, and the card when it could not go to README.md."""
    lines = [dangling_note(Path(out_dir))]
    if not card_is_ours(Path(out_dir)) and (Path(out_dir) / CARD_COPY).exists():
        lines.append(f"dataset card: {Path(out_dir) / CARD_COPY} ({CARD} is not cogalign's and was kept; "
                     "`publish --card ours` uploads cogalign's card in its place)")
    return "\n".join(filter(None, lines))


def dangling_note(out_dir: Path, sample: int = 256) -> str:
    """A warning when image paths of the first records are no files under the run's image root (an input
    that held its images as bytes: Hub parquet, save_to_disk), unless --embed-images kept the bytes."""
    from cogalign.expand.writer import read_shard

    try:
        manifest = read_manifest(out_dir, run=True)
    except Exception:
        return ""
    if manifest["options"].get("embed_images") or not manifest.get("image_root"):
        return ""
    layout = Layout(out_dir, manifest["num_shards"], manifest["format"])
    root, seen, missing = Path(manifest["image_root"]), 0, 0
    for i in range(layout.num_shards):
        if seen >= sample or not layout.is_complete(i):
            break
        for record in read_shard(layout.shard_path(i)):
            image = record.get("image") if isinstance(record, dict) else None
            for item in image if isinstance(image, list) else [image] if isinstance(image, str) else []:
                seen += 1
                missing += not (root / item).is_file()
            if seen >= sample:
                break
    if not missing:
        return ""
    return (f"warning: {missing} of the first {seen} image paths are no files under {root} (the input held its "
            "images as bytes?): the output keeps only their names; rerun with --embed-images to keep the images "
            "(`export` rejects records whose images are no files)")


@contextlib.contextmanager
def _removed_on_error(tmp: Path):
    try:
        yield
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _merge_llava_file(layout: Layout, name: str) -> Path:
    """One LLaVA file from the shards: a JSON array (json) or JSON lines (jsonl)."""
    final = layout.root / name
    tmp = temp_name(final)
    with _removed_on_error(tmp), open(tmp, "wb") as out:
        first = True
        if layout.fmt == "json":
            out.write(b"[")
        for i in range(layout.num_shards):
            with open(layout.shard_path(i), "rb") as f:
                for line in f:
                    if layout.fmt == "json":
                        out.write(b"\n" if first else b",\n")
                        out.write(line.rstrip(b"\n"))
                    else:
                        out.write(line)
                    first = False
        if layout.fmt == "json":
            out.write(b"\n]\n")
    tmp.replace(final)
    return final


_PARQUET_FEATURES = """  features:
  - name: id
    dtype: string
  - name: image
    dtype: {image}
  - name: conversations
    list:
    - name: from
      dtype: string
    - name: value
      dtype: string
  - name: cogalign
    dtype: string
  - name: extra
    dtype: string
"""

_IMAGES_FEATURE = """  - name: images
    list: image
"""

_PARQUET_COLUMNS = """Columns: `id`, `image` ({image}), `conversations` (LLaVA `from`/`value` turns),
`cogalign` (JSON provenance: regions, template ids, resolutions, tokenizer hash, seed) and
`extra` (JSON of any other keys of the source record, and of any value the typed columns
cannot hold, such as an integer `id` or a list `image`). `cogalign.expand.writer.read_shard`
gives the records back as they were."""

_JSONL_COLUMNS = """Each line of `data/train-*.jsonl` is one LLaVA record as it was, with its new turns
spliced into `conversations` and a `cogalign` object (provenance: regions, template ids,
resolutions, tokenizer hash, seed) on expanded records. The card declares no column types:
`datasets` infers them from the records, so every key and turn key of the source is a
column. A key whose JSON type differs between records (an `id` that is a number in one
record and a string in another) cannot become one Arrow column; `--format parquet` keeps
such values in its `extra` column."""


def dataset_card(report: dict, manifest: dict, license: str | None = None) -> str:
    """The Hub dataset card: `configs` and `dataset_info` that match what the format wrote; `license`
    (the source data's, given to `publish --license`) goes into the header when known."""
    opts = manifest["options"]
    parquet = manifest["format"] == "parquet"
    data_glob = "data/train-*" + (".parquet" if parquet else ".jsonl")
    kept = report["expanded"] + report["passed"]
    embedded = bool(opts.get("embed_images"))
    image = "image" if embedded else "string"
    features = _PARQUET_FEATURES.format(image=image) + (_IMAGES_FEATURE if embedded else "") if parquet else ""
    image_note = ("the source image file's bytes, a `datasets` Image: `load_dataset` gives PIL images, "
                  "no local files needed; a record with several images has them all in `images`, a list of Images"
                  if embedded else "the path or name the source record gave, relative to the run's image folder; "
                  "an input that held its images as bytes (Hub parquet, `save_to_disk`) gives names that are no "
                  "files: run `expand --embed-images` to keep the images")
    columns = _PARQUET_COLUMNS.format(image=image_note) if parquet else _JSONL_COLUMNS
    num_bytes = report.get("arrow_bytes")
    source = source_dataset(manifest)
    header = [f"license: {license}"] if license else []
    header += ["task_categories:", "- image-text-to-text"]
    header += ["source_datasets:", f"- {source}"] if source else []
    demo = opts.get("vq") == "demo" or str(opts.get("tokenizer_name") or "").startswith("demo-")
    warning = ("\n**The VQ targets were made with cogalign's `demo` tokenizer, a small VQGAN for trying cogalign "
               "out: this data is not for training a model.** Rerun `expand` with a real tokenizer (`--vq`).\n"
               if demo and "vq" in opts["targets"] else "")
    reasons = top_reasons(report.get("reject_reasons", {}))
    return f"""---
{chr(10).join(header)}
configs:
- config_name: default
  data_files:
  - split: train
    path: {data_glob}
dataset_info:
{features}  splits:
  - name: train
    num_examples: {kept}
{f"    num_bytes: {num_bytes}{chr(10)}" if num_bytes is not None else ""}tags:
- llava
- cognition-alignment
---
# LLaVA data with cognition-alignment turns
{warning}
Made with cogalign {manifest['cogalign_version']} from {source_label(manifest)}
({manifest['records']} records): {report['expanded']} expanded with
{' and '.join(opts['targets'])} turns, {report['passed']} passed through unchanged,
{report['rejected']} rejected (reasons: {reasons}).

| option | value |
|---|---|
| targets | {', '.join(opts['targets'])} |
| regions | {', '.join(opts['regions'])} |
| tokenizer | {opts['tokenizer_name'] or '-'} ({opts['tokenizer_hash'] or '-'}) |
| VQ resolution | {'x'.join(map(str, opts['vq_resolution']))} ({opts['vq_scope']} scope) |
| RGB resolution | {'x'.join(map(str, opts['px_resolution']))} |
| resize | {opts['resize']} ({opts['resample']}) |
| seed | {opts['seed']} |

{columns}
"""


def top_reasons(counter: dict, n: int = 5) -> str:
    """The `n` most frequent reasons as `name (count), ...`, or `none`."""
    items = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return ", ".join(f"{k} ({v})" for k, v in items) or "none"


def summary_lines(counts: dict, reject_reasons: dict, seconds: float, where: str, note: str = "",
                  expanded_label: str = "expanded", warnings: dict | None = None,
                  processed: dict | None = None) -> list[str]:
    """`counts` (expand/pass/reject) are what the lines report; throughput is over `processed`
    (the records this run did, when it resumed or reports totals), default `counts`."""
    n = sum(counts.get(k, 0) for k in ("expand", "pass", "reject"))
    done = processed if processed is not None else counts
    rate = sum(done.get(k, 0) for k in ("expand", "pass", "reject")) / seconds if seconds > 0 else 0.0
    lines = [
        f"records: {n}  {expanded_label}: {counts.get('expand', 0)}  passed: {counts.get('pass', 0)}  "
        f"rejected: {counts.get('reject', 0)}",
        f"top reject reasons: {top_reasons(reject_reasons)}",
        f"time: {seconds:.1f} s  throughput: {rate:.2f} records/s, {done.get('expand', 0) / max(seconds, 1e-9):.2f} images/s",
        f"output: {where}",
    ]
    if warnings:
        lines.insert(2, f"warnings (kept): {top_reasons(warnings)}")
    return lines + ([note] if note else [])


def report_counts(report: dict) -> dict:
    """A report's totals in `summary_lines`' terms."""
    return {"expand": report["expanded"], "pass": report["passed"], "reject": report["rejected"]}


def _indented(obj) -> bytes:
    """JSON indented by 2; integers beyond 64 bits (duplicate ids) kept exact, as `dumps` keeps them."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_INDENT_2)
    except TypeError:
        return json.dumps(obj, indent=2, ensure_ascii=False).encode()
