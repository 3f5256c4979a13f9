"""Arrow-based inputs, streamed batch by batch: parquet files (a file, the chosen split of a
folder or Hub dataset; the Hub layout of lmms-lab/LLaVA-NeXT-Data: `id`, `conversations`,
`data_source`, `image` as `{bytes, path}`), and `datasets` `save_to_disk` folders (Arrow
stream files listed in `state.json`). A file none of whose records is wanted is never opened:
a Hub file is then not downloaded.

An `image` struct with bytes becomes an `EmbeddedImage` (its path, or `embedded-<position>`
when the path is null): the worker decodes the bytes with the same checks as a file. A
struct with a path and no bytes becomes that path; a null image (or one with neither) drops
the key, as LLaVA's JSON has no `image` for text-only records. A list of such structs in `image`
or `images` (the TRL / HF chat layout, beside `messages`) is read the same way, item by item.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from cogalign.errors import InputError, RecordError
from cogalign.inputs.embedded import EmbeddedImage

__all__ = ["iter_arrow", "count_file", "count_arrow", "disk_files", "BATCH_ROWS"]

BATCH_ROWS = 64  # rows turned into Python objects at once (images make rows large)


def disk_files(path: Path) -> list[Path]:
    """The Arrow files of a `save_to_disk` folder (a Dataset, or a DatasetDict with one split)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if len(splits) != 1:
            raise InputError(f"{path}: a DatasetDict with splits {', '.join(splits) or '(none)'}; "
                             f"pass --split NAME or one split's folder, e.g. {path / (splits[0] if splits else 'train')}")
        path = path / splits[0]
    state = path / "state.json"
    try:
        names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{state}: not a readable datasets save_to_disk state ({e}); "
                         "save the dataset with Dataset.save_to_disk") from None
    files = [path / n for n in names]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{missing[0]}: listed in {state} but missing; the save_to_disk folder is incomplete")
    return files


def _check_columns(schema: pa.Schema, file: Path) -> None:
    if "conversations" not in schema.names and "messages" not in schema.names:
        raise InputError(f"{file}: no `conversations` (or `messages`) column; columns are "
                         f"{', '.join(schema.names[:12])}. Expected LLaVA records")


def _batches_parquet(file: Path, first: int, wanted: Callable[[int, int], bool]) -> Iterator[tuple[int, pa.RecordBatch]]:
    try:
        pf = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{file}: not a readable parquet file ({e})") from None
    _check_columns(pf.schema_arrow, file)
    start = first
    for group in range(pf.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        if wanted(start, rows):  # whole row groups that are all skipped are never read
            offset = start
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group]):
                yield offset, batch
                offset += batch.num_rows
        start += rows


def _batches_disk(file: Path, first: int, wanted) -> Iterator[tuple[int, pa.RecordBatch]]:
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(file)))
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{file}: not a readable Arrow stream file ({e})") from None
    _check_columns(reader.schema, file)
    offset = first
    for batch in reader:
        if wanted(offset, batch.num_rows):
            for piece in range(0, batch.num_rows, BATCH_ROWS):
                yield offset + piece, batch.slice(piece, BATCH_ROWS)
        offset += batch.num_rows


_NO_IMAGE = object()


def _image(value, name: str):
    """An `{bytes, path}` struct as an EmbeddedImage (bytes), its path (no bytes), or _NO_IMAGE
    (neither); any other value as it is."""
    if not (isinstance(value, dict) and set(value) <= {"bytes", "path"}):
        return value
    data, path = value.get("bytes"), value.get("path")
    if data is not None:
        return EmbeddedImage(path or name, data)
    return path if path is not None else _NO_IMAGE


def _record(row: dict, position: int) -> dict:
    image = _image(row.get("image"), f"embedded-{position}")
    if image is None or image is _NO_IMAGE:  # a null cell: LLaVA tells text-only records by the key's absence
        row.pop("image", None)
    else:
        row["image"] = image
    for key in ("image", "images"):  # lists of Image structs (`images`: the TRL / HF chat layout)
        if isinstance(row.get(key), list):
            items = [_image(v, f"embedded-{position}-{k}") for k, v in enumerate(row[key])]
            row[key] = [v for v in items if v is not _NO_IMAGE]
            if not row[key]:  # only empty structs: no image (the record check counts the `<image>` tokens)
                del row[key]
    return row


def _unwritable(row: dict) -> RecordError | None:
    """A record whose values JSON cannot hold (binary or decimal columns other than images)
    is rejected, naming the column, instead of stopping the run when it is written."""
    try:
        orjson.dumps(row)
        return None
    except TypeError:
        pass
    for key, value in row.items():
        try:
            orjson.dumps(value)
        except TypeError as e:
            if "64-bit" in str(e):
                continue
            return RecordError("invalid_json", f"column `{key}`: {type(value).__name__} values have no JSON form "
                                               f"({e}); drop or convert that column")
    return None


def iter_arrow(files: list[Path], kind: str, skip: Callable[[int], bool] | None = None) -> Iterator[tuple[int, dict]]:
    """(position, record) for every record of the parquet or save_to_disk `files`, in order; files whose records
    `skip` all drops are never opened."""
    batches = _batches_parquet if kind == "parquet" else _batches_disk
    if skip is None:
        def wanted(start, n):
            return True
    else:
        def wanted(start, n):
            return not all(skip(i) for i in range(start, start + n))
    first = 0
    for file in files:
        n = count_file(file, kind)
        if not wanted(first, n):  # a file none of whose records is wanted is not opened (nor downloaded)
            first += n
            continue
        for offset, batch in batches(_local(file), first, wanted):
            rows = None
            for i in range(batch.num_rows):
                if skip is not None and skip(offset + i):
                    continue
                if rows is None:
                    rows = batch.to_pylist()
                record = _record(rows[i], offset + i)
                yield offset + i, _unwritable(record) or record
        first += n


def _local(file) -> Path:
    return file.local() if hasattr(file, "local") else file  # a Hub file: downloaded into the cache now


def count_file(file, kind: str) -> int:
    """Rows of one parquet or Arrow stream file (a Hub file from its footer, without downloading it)."""
    if hasattr(file, "num_rows"):  # a Hub file: from its footer, without downloading it
        return file.num_rows
    if kind == "parquet":
        try:
            return pq.ParquetFile(file).metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{file}: not a readable parquet file ({e})") from None
    try:
        return sum(batch.num_rows for batch in pa.ipc.open_stream(pa.memory_map(str(file))))
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{file}: not a readable Arrow stream file ({e})") from None


def count_arrow(files: list[Path], kind: str) -> int:
    """Rows of all `files` together."""
    return sum(count_file(f, kind) for f in files)
