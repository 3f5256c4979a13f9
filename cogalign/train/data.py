"""A map-style dataset over an `expand` output folder, and the sampler that orders it.

`ShardDataset[i]` is record i of the folder (shards in order); `-1` is a padding slot. Parquet
shards are read through an uncompressed Arrow IPC copy under the run folder (memory-mapped: any
row in O(1), as `datasets` does), JSON-lines shards through an index of line offsets.

`EpochSampler` shuffles all records at once by (seed, epoch), optionally grouped by modality and
length as LLaVA's `group_by_modality_length`, and pads the epoch with -1 slots to a multiple of
per-device batch × ranks, so accelerate's batch sharding hands every record to exactly one rank
once per epoch and no rank loops back. The Trainer's own resume skips the batches already done.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import torch.utils.data

from cogalign.errors import CogalignError, RecordError
from cogalign.expand.layout import MANIFEST
from cogalign.expand.writer import IMAGE_BYTES, open_parquet, record_of_row, shard_line

__all__ = ["ShardDataset", "EpochSampler", "modality_lengths", "shard_files", "shard_rows", "check_expand_output",
           "default_image_root", "input_image_bytes", "arrow_copy", "PAD"]

PAD = -1


def input_image_bytes(out: Path, record: dict) -> Optional[bytes]:
    """The image bytes that the run's Hub parquet / save_to_disk input embedded for this record (the
    output keeps only the path unless --embed-images); None for a LLaVA JSON input or one not found.
    Reads the input's row group that holds the record: expand with --embed-images to train fast."""
    from cogalign.inspect.records import bytes_from_input
    from cogalign.expand.layout import read_manifest

    try:
        return bytes_from_input(record, read_manifest(Path(out)))
    except CogalignError:
        return None


def shard_files(out: Path) -> list[Path]:
    """The shard files in `out`/data (parquet, else JSON lines), in order; none raises `CogalignError`."""
    data = Path(out) / "data"
    files = sorted(data.glob("*.parquet")) or sorted(data.glob("*.jsonl"))
    if not files:
        raise CogalignError(f"no shards in {data}: give --data the folder that `cogalign expand --out` wrote")
    return files


def check_expand_output(out: Path) -> None:
    """An `expand` output (it has cogalign.json) must be complete, as for train, export and publish; a
    bare data/ folder of shards is read as it is."""
    from cogalign.hub.output import check_complete

    if (Path(out) / MANIFEST).is_file():
        check_complete(out)


def shard_rows(path: Path) -> int:
    """Records in one shard (a parquet footer's row count, or the non-blank lines of a JSON-lines file)."""
    if path.suffix == ".parquet":
        return open_parquet(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def default_image_root(out: Path) -> Path:
    """The folder the shards were made from: the input file's folder, as `cogalign.json` records it."""
    manifest = Path(out) / MANIFEST
    if not manifest.exists():
        raise CogalignError(f"{manifest} is missing: pass --image-root (the folder `image` paths are relative to)")
    src = Path(orjson.loads(manifest.read_bytes())["input"])
    for folder in ([src.parent] if src.is_absolute() else [src.parent, Path(out).parent / src.parent]):
        if folder.is_dir():
            return folder
    raise CogalignError(f"the input folder {src.parent} recorded in {manifest} is not here: pass --image-root")


def arrow_copy(shard: Path, cache: Path) -> Path:
    """An uncompressed Arrow IPC copy of a parquet shard (written once; memory-mapped by readers)."""
    target = cache / (shard.stem + ".arrow")
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    pf = open_parquet(shard)
    tmp = target.with_suffix(f".arrow.{os.getpid()}.tmp")  # ranks may write the same copy at once
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, pf.schema_arrow) as writer:
        for batch in pf.iter_batches(batch_size=1024):
            writer.write_batch(batch)
    tmp.replace(target)
    return target


class _ShardReader:
    """Row access into one shard: an Arrow table (memory-mapped) or a JSON-lines offset index."""

    def __init__(self, path: Path, cache: Optional[Path]):
        self.path, self.cache, self._table, self._offsets = path, cache, None, None

    def __getitem__(self, row: int) -> dict:
        if self.path.suffix == ".parquet":
            if self._table is None:
                src = arrow_copy(self.path, self.cache) if self.cache else None
                self._table = (pa.ipc.open_file(pa.memory_map(str(src))).read_all() if src
                               else pq.read_table(self.path))
            return record_of_row(self._table.slice(row, 1).to_pylist()[0])
        if self._offsets is None:
            self._offsets, pos = [], 0
            with open(self.path, "rb") as f:
                for line in f:
                    if line.strip():
                        self._offsets.append(pos)
                    pos += len(line)
        with open(self.path, "rb") as f:
            f.seek(self._offsets[row])
            return shard_line(self.path, row + 1, f.readline())

    def __getstate__(self):  # DataLoader workers open their own maps
        return {**self.__dict__, "_table": None}


class ShardDataset(torch.utils.data.Dataset):
    """Item i: {"position": i, "record": dict | None, "images": [PIL images], "skip": reason | None}.

    `indices` selects records (global positions in shard order; default all): the train or the
    held-out split. Item -1 is a padding slot (record None). `skip` names why a record cannot be
    used (its image is missing or corrupt), so the collator counts it instead of swapping in another
    sample. Item k is always `indices[k]`: iterating the dataset and a `DataLoader` over it (any
    batch size, any workers, no sampler) give the selected records in the same order, `indices`'
    order. The dataset never shuffles (`shuffle=True` is refused): order it with `EpochSampler`."""

    def __init__(self, out: Path, image_root: Optional[Path] = None, load_images: bool = True,
                 allow_absolute_paths: bool = False, indices: Optional[np.ndarray] = None,
                 cache: Optional[Path] = None, shuffle: bool = False):
        if shuffle:
            raise CogalignError("ShardDataset does not shuffle: give the DataLoader an EpochSampler "
                                "(or shuffle=True) and leave the dataset's order as it is")
        self.files = shard_files(out)
        self.counts = [shard_rows(f) for f in self.files]
        self.starts = np.cumsum([0] + self.counts)
        self.load_images, self.allow_absolute_paths = load_images, allow_absolute_paths
        self.image_root = Path(image_root) if image_root else (default_image_root(out) if load_images else None)
        self.indices = np.arange(self.num_records) if indices is None else np.asarray(indices, dtype=np.int64)
        if cache:  # before any DataLoader worker starts
            for f in self.files:
                if f.suffix == ".parquet":
                    arrow_copy(f, Path(cache))
        self.readers = [_ShardReader(f, Path(cache) if cache else None) for f in self.files]

    @property
    def num_records(self) -> int:
        """Records in the folder (all shards), whatever `indices` selects."""
        return int(sum(self.counts))

    def __len__(self) -> int:
        return len(self.indices)

    def record(self, position: int) -> dict:
        """Record at a global position (shard order)."""
        shard = int(np.searchsorted(self.starts, position, side="right")) - 1
        return self.readers[shard][int(position - self.starts[shard])]

    def __getitem__(self, i: int) -> dict:
        if i == PAD:
            return {"position": PAD, "record": None, "image": None, "images": [], "skip": None}
        position = int(self.indices[i])
        record = self.record(position)
        return {"position": position, "record": record, **self._image(record)}

    def __iter__(self) -> Iterator[dict]:
        for k in range(len(self)):  # indices' order, as a DataLoader reads it
            yield self[k]

    def _image(self, record: dict) -> dict:
        """{"images": the record's images as PIL RGB (0..n, in order), "skip": reason or None,
        "detail"}; "image" is the first one (the earlier interface). Embedded bytes are read first
        (an --embed-images shard), else the file under the image root."""
        from cogalign.inputs.images import load_image, load_image_bytes, resolve_image_path, to_rgb

        names = record.get("image")
        names = [] if names is None or not self.load_images else names if isinstance(names, list) else [names]
        images, embedded = [], record.get(IMAGE_BYTES)
        try:
            for k, name in enumerate(names):
                if not isinstance(name, str):
                    raise RecordError("image_bad_type", f"image {k} is {type(name).__name__}, expected a path")
                if embedded and k < len(embedded) and embedded[k]:
                    images.append(to_rgb(load_image_bytes(embedded[k], name)))
                    continue
                try:
                    images.append(to_rgb(load_image(resolve_image_path(name, self.image_root, self.allow_absolute_paths))))
                except RecordError as e:  # a Hub parquet / save_to_disk input: its bytes, if it is still there
                    data = input_image_bytes(self.files[0].parent.parent, record) if k == 0 and e.reason == "image_missing" else None
                    if data is None:
                        raise
                    images.append(to_rgb(load_image_bytes(data, name)))
        except RecordError as e:
            return {"images": [], "image": None, "skip": e.reason, "detail": f"{record.get('id')}: {e}"}
        return {"images": images, "image": images[0] if images else None, "skip": None, "detail": ""}


def modality_lengths(ds: ShardDataset) -> np.ndarray:
    """Per item: the characters of its conversation, negative for a text-only record (LLaVA's sign)."""
    out = np.zeros(len(ds), dtype=np.int64)
    for k, pos in enumerate(ds.indices):
        rec = ds.record(int(pos))
        n = sum(len(str(t.get("value", ""))) for t in rec.get("conversations") or []) + 1
        out[k] = n if rec.get("image") else -n
    return out


class EpochSampler(torch.utils.data.Sampler):
    """All items in a random order by (seed, epoch), padded with -1 to a multiple of `multiple`.

    With `lengths` (from `modality_lengths`): LLaVA's modality-length grouping. Each megabatch of
    `megabatch` items holds one modality and is sorted longest first; the megabatches are shuffled."""

    def __init__(self, n: int, seed: int, multiple: int, lengths: Optional[np.ndarray] = None,
                 megabatch: int = 1, shuffle: bool = True):
        self.n, self.seed, self.multiple, self.lengths, self.megabatch = n, seed, multiple, lengths, megabatch
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of `epoch` from now on (the Trainer calls it each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.multiple) * self.multiple if self.n else 0

    def order(self) -> np.ndarray:
        """This epoch's order of the `n` items, without the padding."""
        rng = np.random.default_rng([self.seed, self.epoch])
        if not self.shuffle:
            return np.arange(self.n)
        if self.lengths is None:
            return rng.permutation(self.n)
        chunks, rest = [], []
        for mask in (self.lengths > 0, self.lengths < 0):
            idx = rng.permutation(np.flatnonzero(mask))
            full = len(idx) - len(idx) % self.megabatch
            for s in range(0, full, self.megabatch):
                mb = idx[s:s + self.megabatch]
                chunks.append(mb[np.argsort(-np.abs(self.lengths[mb]), kind="stable")])
            rest.append(idx[full:])
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        tail = np.concatenate(rest)
        return np.concatenate(chunks + [tail]) if chunks else tail

    def __iter__(self) -> Iterator[int]:
        order = self.order().tolist()
        yield from order + [PAD] * (len(self) - len(order))
