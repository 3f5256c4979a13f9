"""An IterableDataset over an `expand` output folder: exact rank × worker split, deterministic
shuffle by (seed, epoch), resumable mid-epoch, images read from the image root.

Order. Shards are shuffled, then the rows inside each shard (block shuffle, so a rank reads one
shard at a time). Position i of that epoch sequence belongs to rank i % world. Each rank's list is
padded with empty slots to the same length, so every rank runs the same number of steps. A rank's
list is cut into blocks of `batch_size`; DataLoader worker w takes blocks w, w + W, ..., and since
the DataLoader takes batches from its workers round robin, the batches come out in list order.
`start` skips the first `start` items of the rank's list (a mid-epoch resume).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import orjson
import pyarrow.parquet as pq
import torch.utils.data

from cogalign.errors import CogalignError, RecordError
from cogalign.layout import MANIFEST
from cogalign.records import loads_exact
from cogalign.writer import from_row


IMAGE_BYTES = "_cogalign_image_bytes"  # where a record read from an --embed-images shard keeps its image's bytes


def record_of_row(row: dict) -> dict:
    """A parquet row as a LLaVA record; the bytes of its embedded images (`{bytes, path}`: the
    first in `image`, all of a several-image record in `images`) kept under IMAGE_BYTES, one per image."""
    record = from_row(row)
    if row.get("images"):
        record[IMAGE_BYTES] = [item.get("bytes") for item in row["images"]]
    elif isinstance(row.get("image"), dict) and row["image"].get("bytes"):
        record[IMAGE_BYTES] = [row["image"]["bytes"]]
    return record


def input_image_bytes(out: Path, record: dict) -> Optional[bytes]:
    """The image bytes that the run's Hub parquet / save_to_disk input embedded for this record (the
    output keeps only the path unless --embed-images); None for a LLaVA JSON input or one not found.
    Reads the input's row group that holds the record: expand with --embed-images to train fast."""
    from cogalign.inspect.records import _bytes_from_input
    from cogalign.layout import read_manifest

    try:
        return _bytes_from_input(record, read_manifest(Path(out)))
    except CogalignError:
        return None


def shard_files(out: Path) -> list[Path]:
    data = Path(out) / "data"
    files = sorted(data.glob("*.parquet")) or sorted(data.glob("*.jsonl"))
    if not files:
        raise CogalignError(f"no shards in {data}: give --data the folder that `cogalign expand --out` wrote")
    return files


def shard_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def read_rows(path: Path, rows: set[int]) -> dict[int, dict]:
    """The records at `rows` (0-based) of one shard, as LLaVA dicts."""
    out = {}
    if path.suffix == ".parquet":
        pos = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            wanted = [r - pos for r in range(pos, pos + batch.num_rows) if r in rows]
            if wanted:
                for r, row in zip(wanted, batch.take(wanted).to_pylist()):
                    out[pos + r] = record_of_row(row)
            pos += batch.num_rows
        return out
    with open(path, "rb") as f:
        for i, line in enumerate(l for l in f if l.strip()):
            if i in rows:
                out[i] = loads_exact(line)
    return out


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


def epoch_order(counts: list[int], seed: int, epoch: int) -> np.ndarray:
    """(N, 2) array of (shard, row): shards in a shuffled order, rows shuffled inside each shard."""
    rng = np.random.default_rng([seed, epoch])
    parts = []
    for s in rng.permutation(len(counts)):
        rows = rng.permutation(counts[s])
        parts.append(np.stack([np.full(len(rows), s), rows], axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)


class ShardDataset(torch.utils.data.IterableDataset):
    """Yields one item per slot of this rank's list: {"position", "record", "image", "skip"}.

    `record` is None for a padding slot; `skip` names why a record cannot be used (its image is
    missing or corrupt), so the collator counts it instead of swapping in another sample."""

    def __init__(self, out: Path, seed: int = 0, epoch: int = 0, rank: int = 0, world: int = 1,
                 batch_size: int = 1, start: int = 0, image_root: Optional[Path] = None,
                 load_images: bool = True, allow_absolute_paths: bool = False, shuffle: bool = True):
        self.files = shard_files(out)
        self.counts = [shard_rows(f) for f in self.files]
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world
        self.batch_size, self.start, self.load_images = batch_size, start, load_images
        self.allow_absolute_paths, self.shuffle = allow_absolute_paths, shuffle
        self.image_root = Path(image_root) if image_root else (default_image_root(out) if load_images else None)

    @property
    def num_records(self) -> int:
        return sum(self.counts)

    def rank_length(self) -> int:
        """Slots per rank in one epoch (padded, the same on every rank)."""
        return math.ceil(self.num_records / self.world)

    def rank_list(self) -> np.ndarray:
        """This rank's (shard, row) slots for the epoch; (-1, -1) is padding."""
        order = epoch_order(self.counts, self.seed, self.epoch) if self.shuffle else np.array(
            [(s, r) for s, n in enumerate(self.counts) for r in range(n)], dtype=np.int64).reshape(-1, 2)
        order = order[self.rank::self.world]
        pad = self.rank_length() - len(order)
        return np.concatenate([order, np.full((pad, 2), -1)]) if pad else order

    def positions(self) -> list[int]:
        """Slot positions this DataLoader worker yields, in order."""
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        n = self.rank_length()
        return [p for p in range(self.start, n) if ((p - self.start) // self.batch_size) % nw == wid]

    def __iter__(self) -> Iterator[dict]:
        slots = self.rank_list()
        mine = self.positions()
        cache_shard, cache = -1, {}
        for p in mine:
            shard, row = (int(v) for v in slots[p])
            if shard < 0:
                yield {"position": p, "record": None, "images": [], "image": None, "skip": None}
                continue
            if shard != cache_shard:  # slots are grouped by shard: read each shard's rows once
                need = {int(r) for (s, r), q in zip(slots[mine], mine) if s == shard and q >= p}
                cache_shard, cache = shard, read_rows(self.files[shard], need)
            record = cache.pop(row)
            yield {"position": p, "record": record, **self._image(record)}

    def _image(self, record: dict) -> dict:
        """{"images": the record's images as PIL RGB (0..n, in order), "skip": reason or None,
        "detail"}; "image" is the first one (the earlier interface). Embedded bytes are read first
        (an --embed-images shard), else the file under the image root."""
        from cogalign.images import load_image, load_image_bytes, resolve_image_path, to_rgb

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
