"""A finished output folder as other tools see it: is it complete, and its records in order.

Records come back as LLaVA dicts (`cogalign.expand.writer.read_shard`), integers beyond 64 bits
exact, read a row group at a time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from cogalign.errors import CogalignError
from cogalign.expand.layout import Layout, read_manifest
from cogalign.inputs.records import loads_exact as loads
from cogalign.expand.writer import from_row, open_parquet, read_shard

__all__ = ["check_complete", "iter_output", "iter_layout", "count_records", "image_path", "images_of",
           "inserted_turns"]


def check_complete(out: str | Path) -> Layout:
    """The folder's layout, or CogalignError naming what is missing and the command that completes it."""
    if str(out).startswith("hf:/") and not Path(out).is_dir():  # Path() made hf:// into hf:/
        hub = "hf://" + str(out)[4:].lstrip("/")
        raise CogalignError(f"{hub}: a Hub dataset, not an output folder; run `cogalign expand {hub} --out OUT` "
                            "and give OUT (export, stats and publish read expand's output, with its cogalign.json)")
    out = Path(out)
    if not out.is_dir():
        raise CogalignError(f"{out}: no such output folder; give the --out folder of `cogalign expand`")
    manifest = read_manifest(out)
    layout = Layout(out, manifest["num_shards"], manifest["format"])
    missing = [i for i in range(layout.num_shards) if not layout.is_complete(i)]
    if missing:
        raise CogalignError(f"{out}: {len(missing)} of {layout.num_shards} shards are not complete (first: "
                            f"{layout.shard_path(missing[0]).name}); rerun the same `cogalign expand` command to finish them "
                            "(for a sliced run: run the slices that have not finished, then `cogalign merge-report`)")
    partial = out / ".partial"
    if partial.is_dir() and any(partial.iterdir()):
        raise CogalignError(f"{out}: .partial/ holds unfinished shards ({next(partial.iterdir()).name}); "
                            "a run is still going or was killed: rerun it to finish, or remove .partial/")
    if not (out / "report.json").is_file() or not (out / "README.md").is_file():
        raise CogalignError(f"{out}: no report.json or README.md: the slices were not merged; "
                            f"run `cogalign merge-report {out}` once every slice has finished")
    report = loads((out / "report.json").read_bytes())
    if report.get("fingerprint") != manifest.get("fingerprint") or report.get("input") != manifest.get("records"):
        raise CogalignError(f"{out}: report.json does not match the run in cogalign.json (an older run's report?); "
                            f"run `cogalign merge-report {out}`")
    return layout


def iter_output(out: str | Path) -> Iterator[dict]:
    """Every record of a complete output folder, shard by shard."""
    yield from iter_layout(check_complete(out))


def iter_layout(layout: Layout, with_bytes: bool = False) -> Iterator:
    """Every record of a layout `check_complete` returned, shard by shard. With `with_bytes`,
    (record, bytes of each of its images or None) pairs: the bytes an --embed-images shard holds."""
    for i in range(layout.num_shards):
        path = layout.shard_path(i)
        if not with_bytes:
            yield from read_shard(path)
        elif path.suffix != ".parquet":
            yield from ((record, None) for record in read_shard(path))
        else:
            for batch in open_parquet(path).iter_batches():
                for row in batch.to_pylist():
                    yield from_row(row), _image_bytes(row)


def _image_bytes(row: dict) -> list | None:
    several = row.get("images")
    if several:
        return [item["bytes"] if item else None for item in several]
    image = row.get("image")
    return [image["bytes"]] if isinstance(image, dict) and image.get("bytes") is not None else None


def count_records(out: str | Path) -> int:
    """Records in a finished output folder (expanded + passed, from report.json)."""
    report = loads((Path(out) / "report.json").read_bytes())
    return report["expanded"] + report["passed"]


def image_path(image) -> str | None:
    """The path of an `image` value: a string, or a `datasets` Image struct `{bytes, path}`."""
    if isinstance(image, str):
        return image
    if isinstance(image, dict) and isinstance(image.get("path"), str):
        return image["path"]
    return None


def images_of(record: dict) -> list:
    """The record's images as a list (none, one, or LLaVA-NeXT's list)."""
    image = record.get("image")
    if image is None:
        return []
    return list(image) if isinstance(image, list) else [image]


def inserted_turns(record: dict) -> dict[int, str]:
    """Conversation index -> kind ("vq"/"px") of each turn cogalign inserted, from the `cogalign.turns`
    provenance. Pairs sharing a position keep their order, so the pair ranked r (stable order by
    position) that follows original pair p starts at index 2 (p + r)."""
    meta = record.get("cogalign")
    turns = meta.get("turns") if isinstance(meta, dict) else None
    if not turns:
        return {}
    positions = [t["position"] for t in turns]
    if any(not isinstance(p, int) or isinstance(p, bool) or p < 1 for p in positions):
        raise ValueError(f"cogalign.turns positions must be integers >= 1, got {positions}")
    ranked = sorted(range(len(turns)), key=lambda j: positions[j])
    out = {}
    for rank, j in enumerate(ranked):
        start = 2 * (turns[j]["position"] + rank)
        out[start] = out[start + 1] = turns[j]["kind"]
    return out
