"""Training images: from files, folders, or the images of a LLaVA JSON / JSONL / parquet
input (resolved under its image root as `expand` resolves them), decoded with
`cogalign.inputs.images`, and cut into random crops in an order fixed by (seed, rank, step)."""
from __future__ import annotations

import math
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from cogalign.errors import CogalignError, RecordError
from cogalign.inputs.images import load_image, load_image_bytes, resolve_image_path
from cogalign.options import DEFAULT_MAX_IMAGE_PIXELS
from cogalign.tokenizers.base import TokenizerError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RECORD_SUFFIXES = (".json", ".jsonl", ".parquet")
SQUARE_SIZES = (256, 448, 672)  # the toolkit stretches images to a square before encoding


@dataclass(frozen=True)
class ImageRef:
    """One training image: a file, or encoded bytes from a parquet row."""
    name: str
    path: Path | None = None
    data: bytes | None = None


@dataclass
class ImageSet:
    refs: list[ImageRef]
    skipped: Counter  # reason -> records of a LLaVA input that gave no image


def load_rgb(ref: ImageRef | str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB, decoded exactly as `expand` decodes (cogalign.inputs.images)."""
    if not isinstance(ref, ImageRef):
        ref = ImageRef(str(ref), Path(ref))
    try:
        image = load_image(ref.path, max_pixels) if ref.path is not None else load_image_bytes(ref.data, ref.name, max_pixels)
        return np.array(image, dtype=np.uint8)
    except RecordError as e:
        raise TokenizerError(f"{ref.name}: {e.reason}: {e.detail}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise TokenizerError(f"{ref.name}: cannot decode this image ({e})") from None


def collect_images(items: Iterable[str | Path], image_root: str | Path | None = None,
                   allow_absolute: bool = False) -> ImageSet:
    """Image files as given, folders searched recursively (sorted), and the first image of
    each record of a .json / .jsonl / .parquet LLaVA input (text-only and bad records are
    counted in `skipped`, by reason)."""
    refs: list[ImageRef] = []
    skipped: Counter = Counter()
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise TokenizerError(f"{p}: no image files found (looked for {', '.join(IMAGE_SUFFIXES)})")
            refs.extend(ImageRef(str(q), q) for q in found)
        elif p.is_file() and p.suffix.lower() in RECORD_SUFFIXES:
            root = Path(image_root) if image_root else p.parent
            reader = _from_parquet if p.suffix.lower() == ".parquet" else _from_records
            got = reader(p, root, allow_absolute, skipped)
            if not got:
                hint = ("pass --allow-absolute-paths to accept absolute image paths" if skipped["image_path_absolute"]
                        else f"a path or a symlink leads out of {root}: pass the folder that really holds the "
                        "images as --image-root" if skipped["image_path_escapes_root"]
                        else "check --image-root (default: the input's folder)")
                raise TokenizerError(f"{p}: no usable images in this input ({_reasons(skipped)}); {hint}")
            refs.extend(got)
        elif p.is_file():
            refs.append(ImageRef(str(p), p))
        else:
            raise TokenizerError(f"{p}: no such image file, folder or LLaVA input")
    if not refs:
        raise TokenizerError("no images given; pass image files, folders, or a LLaVA .json/.jsonl/.parquet input")
    return ImageSet(refs, skipped)


def _reasons(c: Counter) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) or "no records"


def _resolve(value, root: Path, allow_absolute: bool, skipped: Counter) -> ImageRef | None:
    try:
        p = resolve_image_path(value, root, allow_absolute)
    except RecordError as e:
        skipped[e.reason] += 1
        return None
    return ImageRef(str(p), p)


def _from_records(path: Path, root: Path, allow_absolute: bool, skipped: Counter) -> list[ImageRef]:
    from cogalign.inputs import iter_input
    from cogalign.inputs.records import check_record

    out = []
    try:
        for _, rec in iter_input(path):
            if isinstance(rec, RecordError):
                skipped[rec.reason] += 1
                continue
            try:
                check = check_record(rec)
            except RecordError as e:
                skipped[e.reason] += 1
                continue
            if check.image is None:
                skipped[check.pass_reason] += 1
                continue
            ref = _resolve(check.image, root, allow_absolute, skipped)
            if ref is not None:
                out.append(ref)
    except CogalignError as e:
        raise TokenizerError(str(e)) from None
    return out


def _from_parquet(path: Path, root: Path, allow_absolute: bool, skipped: Counter) -> list[ImageRef]:
    """`image` column: a path string (resolved under root), a list of them (the first),
    or a Hugging Face Image struct {bytes, path} (the bytes are kept in memory)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise TokenizerError(f"{path}: not a readable parquet file ({e})") from None
    if "image" not in pf.schema_arrow.names:
        raise TokenizerError(f"{path}: no `image` column (columns: {', '.join(pf.schema_arrow.names)})")
    out = []
    row = 0
    for batch in pf.iter_batches(columns=["image"], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, dict):
                if value.get("bytes"):
                    out.append(ImageRef(f"{path} row {row}", data=value["bytes"]))
                    row += 1
                    continue
                value = value.get("path")
            if value is None:
                skipped["text_only"] += 1
            else:
                ref = _resolve(value, root, allow_absolute, skipped)
                if ref is not None:
                    out.append(ref)
            row += 1
    return out


def resize_rgb(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    if arr.shape[1] == width and arr.shape[0] == height:
        return arr
    return np.asarray(Image.fromarray(arr).resize((width, height), Image.BICUBIC), dtype=np.uint8)


def to_model_input(batch: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1] (x / 127.5 - 1), contiguous NCHW."""
    batch = np.ascontiguousarray(batch)
    x = torch.from_numpy(batch if batch.flags.writeable else batch.copy()).permute(0, 3, 1, 2).float().contiguous()
    return x / 127.5 - 1.0


def from_model_output(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 (rounded, clipped)."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


class CropBatches(torch.utils.data.Dataset):
    """batches[step] = (batch_size, crop, crop, 3) uint8 random crops (with horizontal flips)
    of random images, each at its own size or stretched to one of SQUARE_SIZES.

    The batch depends only on (seed, rank, step), so a resumed run and a run with data
    loader workers see the same data. An image that cannot be decoded is replaced by the
    next one in the list; `bad` lists those seen by this process."""

    def __init__(self, refs: list[ImageRef], crop: int, batch_size: int, seed: int = 0, rank: int = 0,
                 square_sizes=SQUARE_SIZES, cache: int = 128):
        self.refs, self.crop, self.batch_size, self.seed, self.rank = refs, crop, batch_size, seed, rank
        self.sizes = [0] + [s for s in square_sizes if s >= crop]  # 0: the image's own size
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_size = cache
        self.bad: dict[str, str] = {}

    def __len__(self) -> int:
        return 2 ** 62

    def image(self, i: int) -> np.ndarray:
        """Image i decoded (the next decodable one if it cannot be)."""
        return self._view(i, -1)

    def _view(self, i: int, size: int) -> np.ndarray:
        """Image i at `size` (0: its own size, upscaled to the crop if smaller; -1: as decoded), or
        the next decodable one."""
        for k in range(len(self.refs)):
            j = (i + k) % len(self.refs)
            if self.refs[j].name in self.bad:
                continue
            try:
                return self._load(j, size)
            except TokenizerError as e:
                self.bad[self.refs[j].name] = str(e)
        raise TokenizerError(f"none of the {len(self.refs)} images could be decoded; first: {next(iter(self.bad.values()))}")

    def _load(self, j: int, size: int) -> np.ndarray:
        """Image j at `size`, cached; a TokenizerError when it cannot be decoded."""
        if (j, size) in self._cache:
            self._cache.move_to_end((j, size))
            return self._cache[(j, size)]
        arr = self.resized(self._load(j, -1), size) if size >= 0 else load_rgb(self.refs[j])
        self._cache[(j, size)] = arr
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return arr

    def resized(self, arr: np.ndarray, size: int) -> np.ndarray:
        h, w = arr.shape[:2]
        if size:
            return resize_rgb(arr, size, size)
        if min(h, w) < self.crop:
            s = self.crop / min(h, w)
            return resize_rgb(arr, max(self.crop, math.ceil(w * s)), max(self.crop, math.ceil(h * s)))
        return arr

    def crops(self, rng: np.random.Generator, n: int) -> np.ndarray:
        c = self.crop
        out = np.empty((n, c, c, 3), dtype=np.uint8)
        for k in range(n):
            i = int(rng.integers(len(self.refs)))
            v = self._view(i, self.sizes[int(rng.integers(len(self.sizes)))])
            y = int(rng.integers(v.shape[0] - c + 1))
            x = int(rng.integers(v.shape[1] - c + 1))
            patch = v[y:y + c, x:x + c]
            out[k] = patch[:, ::-1] if rng.random() < 0.5 else patch
        return out

    def __getitem__(self, step: int) -> np.ndarray:
        return self.crops(np.random.default_rng([self.seed, self.rank, int(step)]), self.batch_size)

    def init_crops(self, n: int) -> np.ndarray:
        """Crops for the k-means codebook init: the same on every rank."""
        return self.crops(np.random.default_rng([self.seed, 2 ** 31]), n)
