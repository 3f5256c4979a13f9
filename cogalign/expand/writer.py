"""Shard writers: parquet (pyarrow, Hub layout) or LLaVA JSONL, published atomically.

A shard is written under a temporary name and renamed into place when complete;
the executor writes its stats file (the completion marker) after that, so a
crash never leaves a partial shard that looks complete.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from cogalign.errors import CogalignError
from cogalign.inputs.records import loads_exact

__all__ = ["ParquetShardWriter", "JsonlShardWriter", "open_shard", "read_shard", "open_parquet", "shard_line", "dumps", "to_row", "from_row",
           "record_of_row", "embed", "rows_to_table", "shard_name", "partial_path", "temp_name", "write_atomic",
           "SCHEMA", "EMBEDDED_SCHEMA", "TURN_TYPE", "IMAGE_TYPE", "TYPED_KEYS", "IMAGE_BYTES", "ARROW_BYTES_KEY",
           "ROW_GROUP_BYTES"]

ARROW_BYTES_KEY = "cogalign.arrow_bytes"  # parquet footer key: the shard's records in Arrow, in bytes
ROW_GROUP_BYTES = 8 * 1024 * 1024  # the Hub asks for ~100 MB or less; a writer needs ~10x this while it flushes one
TURN_TYPE = pa.struct([("from", pa.string()), ("value", pa.string())])
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.string()),
    ("conversations", pa.list_(TURN_TYPE)),
    ("cogalign", pa.string()),  # provenance as JSON (null for records passed through)
    ("extra", pa.string()),     # JSON of every other key, and of any value the typed columns cannot hold
])
TYPED_KEYS = ("id", "image", "conversations", "cogalign")
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the datasets Image feature
# What `datasets` reads back as the features of an --embed-images shard (also declared in the card).
_HF_FEATURES = {"id": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"},
                "conversations": {"feature": {"from": {"dtype": "string", "_type": "Value"},
                                              "value": {"dtype": "string", "_type": "Value"}}, "_type": "List"},
                "cogalign": {"dtype": "string", "_type": "Value"}, "extra": {"dtype": "string", "_type": "Value"},
                "images": {"feature": {"_type": "Image"}, "_type": "List"}}
# --embed-images: `image` holds the record's first image; `images` (TRL's layout, a list of Images) every
# image of a record that has several, [] otherwise (so one-image records do not store their bytes twice).
EMBEDDED_SCHEMA = pa.schema([f if f.name != "image" else pa.field("image", IMAGE_TYPE) for f in SCHEMA]
                            + [pa.field("images", pa.list_(IMAGE_TYPE))]) \
    .with_metadata({b"huggingface": orjson.dumps({"info": {"features": _HF_FEATURES}})})


def dumps(obj) -> bytes:
    """Compact JSON, as orjson writes it; integers beyond 64 bits (which orjson refuses) are
    kept exact by falling back to the standard library for that one value (spec §6)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def shard_name(index: int, count: int, fmt: str, split: str = "train") -> str:
    """The Hub's shard file name, `train-00003-of-00010.parquet` (`.jsonl` for JSON lines)."""
    ext = "parquet" if fmt == "parquet" else "jsonl"
    return f"{split}-{index:05d}-of-{count:05d}.{ext}"


def to_row(record: dict) -> dict:
    """A LLaVA record as one parquet row; `from_row` gives back an equal record."""
    extra = {k: v for k, v in record.items() if k not in TYPED_KEYS}
    row = {"id": None, "image": None, "conversations": None, "cogalign": None}
    rid = record.get("id")
    if isinstance(rid, str):
        row["id"] = rid
    elif "id" in record:
        extra["id"] = rid
    image = record.get("image")
    if isinstance(image, str):
        row["image"] = image
    elif "image" in record:
        extra["image"] = image
    conv = record.get("conversations")
    if all(isinstance(t, dict) and set(t) == {"from", "value"} for t in conv):
        row["conversations"] = conv
    else:
        extra["conversations"] = conv
    if record.get("cogalign") is not None:
        row["cogalign"] = dumps(record["cogalign"]).decode()
    elif "cogalign" in record:
        extra["cogalign"] = None
    row["extra"] = dumps(extra).decode() if extra else None
    return row


def embed(row: dict, record: dict, image_bytes: bytes | list[bytes] | None) -> dict:
    """`row` with the image file bytes of `record` for an --embed-images shard: the first image in
    `image`, and with several images (a list of bytes, one per path in `record["image"]`) all of
    them, paired with their paths, in `images`."""
    if image_bytes is None:
        return row
    several = isinstance(image_bytes, list)
    row["image_bytes"] = image_bytes[0] if several else image_bytes
    if row["image"] is None:  # a list of images: the first one is the one in `image`
        row["image"] = str(record["image"][0])
    if several and len(image_bytes) > 1:
        paths = [str(p) for p in record["image"]]
        if len(paths) != len(image_bytes):
            raise ValueError(f"{len(image_bytes)} images' bytes for {len(paths)} image paths")
        row["images"] = list(zip(paths, image_bytes))
    return row


def from_row(row: dict) -> dict:
    """Inverse of `to_row` (key order follows LLaVA: id, image, conversations, others, cogalign)."""
    extra = loads_exact(row["extra"]) if row.get("extra") else {}
    out = {}
    image = row.get("image")
    if isinstance(image, dict):  # an --embed-images shard: the record keeps the path
        row = {**row, "image": image.get("path")}
    for key in ("id", "image", "conversations"):
        if key in extra:
            out[key] = extra.pop(key)
        elif row.get(key) is not None:
            out[key] = row[key]
    out.update(extra)
    if row.get("cogalign"):
        out["cogalign"] = loads_exact(row["cogalign"])
    return out


IMAGE_BYTES = "_cogalign_image_bytes"  # where `record_of_row` keeps a record's embedded image bytes


def record_of_row(row: dict) -> dict:
    """`from_row`, keeping the bytes of an --embed-images row's images under IMAGE_BYTES, one per
    image (the first from `image`, all of a several-image record from `images`)."""
    record = from_row(row)
    if row.get("images"):
        record[IMAGE_BYTES] = [item.get("bytes") for item in row["images"]]
    elif isinstance(row.get("image"), dict) and row["image"].get("bytes"):
        record[IMAGE_BYTES] = [row["image"]["bytes"]]
    return record


def partial_path(path: Path) -> Path:
    """Where a shard is written before it is published: outside data/, so no glob ever sees it."""
    tmp_dir = Path(path).parent.parent / ".partial"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    return tmp_dir / Path(path).name


def _strings(values: list) -> pa.Array:
    """A string array built from one joined buffer: pyarrow's own conversion of Python str
    slows to ~10 ms per megabyte-long value in some orders of small and large values."""
    if any(v is None for v in values):
        return pa.array(values, pa.string())
    data = [v.encode() for v in values]
    offsets = np.zeros(len(data) + 1, np.int64)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    if offsets[-1] >= 2**31:
        return pa.array(values, pa.large_string()).cast(pa.string())  # unreachable with 8 MB row groups
    return pa.Array.from_buffers(pa.string(), len(data),
                                 [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(data))])


def _images(data: list, paths: list) -> pa.StructArray:
    """The datasets Image struct {bytes, path}; null where there are no bytes."""
    return pa.StructArray.from_arrays([pa.array(data, pa.binary()), _strings(paths)], fields=list(IMAGE_TYPE),
                                      mask=_nulls([b is None for b in data]))


def _nulls(flags: list[bool]) -> pa.Array | None:
    """A null mask, or None when nothing is null: no validity buffer, as pyarrow reads the column back
    (so the Arrow size counted here is what `datasets` reports)."""
    return pa.array(flags, pa.bool_()) if any(flags) else None


def rows_to_table(rows: list[dict], schema: pa.Schema = SCHEMA) -> pa.Table:
    """Column by column (10x faster than `Table.from_pylist`, which walks every value in Python)."""
    convs = [r["conversations"] for r in rows]
    offsets, n = [0], 0
    for conv in convs:
        n += len(conv) if conv is not None else 0
        offsets.append(n)
    turns = [t for conv in convs if conv is not None for t in conv]
    struct = pa.StructArray.from_arrays([_strings([t["from"] for t in turns]),
                                         _strings([t["value"] for t in turns])], fields=list(TURN_TYPE))
    conversations = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), struct,
                                             mask=_nulls([c is None for c in convs]))
    columns = {name: _strings([r[name] for r in rows]) for name in ("id", "image", "cogalign", "extra")}
    columns["conversations"] = conversations
    if schema.field("image").type == IMAGE_TYPE:  # {bytes, path}; null where no image was embedded
        data = [r.get("image_bytes") for r in rows]
        paths = [r["image"] if b is not None else None for r, b in zip(rows, data)]
        columns["image"] = _images(data, paths)
        many = [r.get("images") or [] for r in rows]  # [(path, bytes), ...] of a several-image record
        flat = [item for items in many for item in items]
        columns["images"] = pa.ListArray.from_arrays(
            pa.array(np.cumsum([0] + [len(items) for items in many]), pa.int32()),
            _images([b for _, b in flat], [p for p, _ in flat]))
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


class ParquetShardWriter:
    """With `embed_images`, the `image` column is the datasets Image struct {bytes, path}:
    the path of the record's (first) image and the bytes of its file, as `write` gets them;
    a record with several images gets a list of bytes, one per image, and keeps them all in `images`.
    A row group is cut before a record would take its values (images included) past
    `row_group_bytes`, so it passes that only when one record alone does."""

    def __init__(self, path: Path, row_group_bytes: int = ROW_GROUP_BYTES, embed_images: bool = False):
        self.path, self.tmp = Path(path), partial_path(path)
        self.row_group_bytes = row_group_bytes
        self.schema = EMBEDDED_SCHEMA if embed_images else SCHEMA
        self._writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        self._rows: list[dict] = []
        self._bytes = 0
        self.records = 0
        self.arrow_bytes = 0  # the records' Arrow size, what `datasets` counts as num_bytes

    def write(self, record: dict, image_bytes: bytes | list[bytes] | None = None) -> None:
        """Add one record (and its image file's bytes with `embed_images`)."""
        row = embed(to_row(record), record, image_bytes)
        size = sum(len(t["value"]) for t in row["conversations"] or ()) + len(row["extra"] or "") + \
            len(row.get("image_bytes") or b"") + sum(len(b) for _, b in row.get("images") or ())
        if self._rows and self._bytes + size > self.row_group_bytes:
            self._flush()  # a row group passes the limit only when one record alone does
        self._rows.append(row)
        self._bytes += size
        self.records += 1

    def _flush(self) -> None:
        if self._rows:
            table = rows_to_table(self._rows, self.schema)
            self.arrow_bytes += table.nbytes
            self._writer.write_table(table)
        self._rows, self._bytes = [], 0

    def close_partial(self) -> Path:
        """Finish the file under `.partial/` (the caller publishes it with `_publish`)."""
        self._flush()
        self._writer.add_key_value_metadata({ARROW_BYTES_KEY: str(self.arrow_bytes)})
        self._writer.close()
        return self.tmp

    def close(self) -> int:
        """Finish and publish the shard (rename into place); returns its size in bytes."""
        return _publish(self.close_partial(), self.path)

    def abort(self) -> None:
        """Close and delete the unfinished file."""
        try:
            self._writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class JsonlShardWriter:
    """A JSON-lines shard, one record a line (exact big integers), written under `.partial/`."""

    def __init__(self, path: Path):
        self.path, self.tmp = Path(path), partial_path(path)
        self._file = open(self.tmp, "wb")
        self.records = 0

    def write(self, record: dict, image_bytes: bytes | None = None) -> None:
        """Add one record (`image_bytes` is ignored: JSON lines keep paths)."""
        self._file.write(dumps(record) + b"\n")
        self.records += 1

    def close_partial(self) -> Path:
        """Finish the file under `.partial/` (fsync) and return its path."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self.tmp

    def close(self) -> int:
        """Finish and publish the shard (rename into place); returns its size in bytes."""
        return _publish(self.close_partial(), self.path)

    def abort(self) -> None:
        """Close and delete the unfinished file."""
        self._file.close()
        self.tmp.unlink(missing_ok=True)


def open_shard(path: Path, fmt: str, embed_images: bool = False):
    """A writer for shard `path` in `fmt` (`parquet` or JSON lines)."""
    return ParquetShardWriter(path, embed_images=embed_images) if fmt == "parquet" else JsonlShardWriter(path)


def _publish(tmp: Path, final: Path) -> int:
    """fsync, then rename into place: readers see a whole shard or none. Returns its size."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final.stat().st_size


def temp_name(path: Path) -> Path:
    """A temporary name of its own: ranks and slices on several machines may write the same file at once."""
    return Path(f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: readers never see half a file."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_parquet(path: Path) -> pq.ParquetFile:
    """A published parquet shard, opened; one that is no parquet file (changed since) is a CogalignError."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise CogalignError(f"{path}: not a readable parquet shard ({e}); it was changed since expand wrote it: "
                            "rerun the `cogalign expand` command with --overwrite to write it again") from None


def read_shard(path: Path) -> Iterator[dict]:
    """Records of one published shard, as LLaVA dicts."""
    path = Path(path)
    if path.suffix == ".parquet":
        for batch in open_parquet(path).iter_batches():
            yield from (from_row(r) for r in batch.to_pylist())
    else:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield shard_line(path, number, line)


def shard_line(path: Path, number: int, line: bytes) -> dict:
    """Line `number` of a published JSON-lines shard; one that is not JSON (changed since) is a CogalignError."""
    try:
        return loads_exact(line)
    except ValueError as e:
        raise CogalignError(f"{path}: line {number} is not JSON ({e}); the shard was changed since expand wrote it: "
                            "rerun the `cogalign expand` command with --overwrite to write it again") from None
