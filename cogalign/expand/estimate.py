"""Size estimates: target text length, output bytes, and the shard size that keeps shards Hub-sized."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from cogalign.targets.regions import region_box

__all__ = ["mean_digits", "region_pixels", "target_chars", "record_bytes", "auto_shard_size", "mean_image_bytes",
           "format_bytes", "output_bytes", "parse_size", "human_bytes", "synthetic_grid", "encoder_seconds",
           "vq_crop_bytes", "write_seconds", "SHARD_TARGET_BYTES", "MAX_SHARD_RECORDS", "DEFAULT_MEMORY_BUDGET"]

SHARD_TARGET_BYTES = 256 * 1024 * 1024  # the Hub asks for shards under ~500 MB uncompressed
MAX_SHARD_RECORDS = 10_000
TURN_OVERHEAD = 400  # prompt, hint and provenance per turn, in characters
DEFAULT_MEMORY_BUDGET = 512 * 1000 ** 2  # `expand --memory-budget`: bytes between the stages
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def mean_digits(upper: int) -> float:
    """Mean decimal length of integers uniform in [0, upper)."""
    return sum(len(str(v)) for v in range(upper)) / upper if upper < 100_000 else len(str(upper - 1))


def region_pixels(options, kind: str, factor: int = 1) -> int:
    """Largest pixel count among the allowed regions of a kind (a `box` may be the whole image)."""
    h, w = options.vq_resolution if kind == "vq" else options.px_resolution
    sizes = []
    for name in options.regions:
        if name == "box":
            sizes.append(h * w)
        else:
            x0, y0, x1, y1 = region_box(name, h, w, factor)
            sizes.append((x1 - x0) * (y1 - y0))
    return max(sizes)


def target_chars(options, tokenizer=None) -> dict[str, int]:
    """Expected characters of each target's answer (uniformly distributed values)."""
    out = {}
    if "px" in options.targets:
        per_pixel = 3 * mean_digits(256) + len("[, , ], ")
        out["px"] = int(region_pixels(options, "px") * per_pixel)
    if "vq" in options.targets and tokenizer is not None:
        f = tokenizer.downsample
        n = region_pixels(options, "vq", f) // (f * f)
        out["vq"] = int(n * (mean_digits(tokenizer.codebook_size) + 2))
    return out


def record_bytes(options, tokenizer=None) -> int:
    """Estimated bytes one image record adds to the output: its target text plus the turns' overhead."""
    return sum(target_chars(options, tokenizer).values()) + TURN_OVERHEAD * len(options.targets) + 1000


def auto_shard_size(options, tokenizer=None, input_path=None, image_root=None) -> int:
    """Records per shard for shards of about SHARD_TARGET_BYTES: the target text, and with
    --embed-images the image files' bytes (measured on the first records of `input_path`)."""
    per_record = record_bytes(options, tokenizer)
    if getattr(options, "embed_images", False) and input_path is not None:
        per_record += mean_image_bytes(input_path, image_root, options)
    return max(1, min(MAX_SHARD_RECORDS, SHARD_TARGET_BYTES // per_record))


def mean_image_bytes(input_path, image_root, options, samples: int = 64, scan: int = 1024) -> int:
    """Mean bytes of image files per record, over the first records (up to `scan`) until `samples`
    records with images were seen; records without images count as 0. Unreadable images count as 0
    (the run rejects them). The same input gives the same figure, so a resume gets the same shard size."""
    from cogalign.errors import CogalignError, RecordError
    from cogalign.inputs.images import resolve_image_path
    from cogalign.inputs import image_root as resolve_image_root
    from cogalign.inputs.embedded import EmbeddedImage
    from cogalign.inputs.turns import to_llava
    from cogalign.inputs import iter_input

    root = Path(image_root) if image_root is not None else Path(resolve_image_root(input_path, None))
    total = records = with_images = 0
    for _, record in _records(iter_input(input_path, seed=options.seed)):
        if records >= scan or with_images >= samples:
            break
        records += 1
        try:
            record = to_llava(record)[0] if isinstance(record, dict) else None
        except RecordError:
            record = None
        image = record.get("image") if isinstance(record, dict) else None
        items = image if isinstance(image, list) else [image] if image is not None else []
        with_images += bool(items)
        for item in items:
            if isinstance(item, EmbeddedImage):
                total += len(item.data)
            elif isinstance(item, str):
                try:
                    total += resolve_image_path(item, root, options.allow_absolute_paths).stat().st_size
                except (OSError, CogalignError):
                    pass
    return total // records if records else 0


def _records(pairs):
    """The (position, record) pairs until the input turns out unreadable (the run reports that itself)."""
    from cogalign.errors import CogalignError

    try:
        yield from pairs
    except CogalignError:
        return


def format_bytes(records: list, fmt: str, images: list | None = None) -> float:
    """Mean bytes one of these records takes in a `fmt` shard, measured by writing them
    (parquet: zstd-compressed, less the fixed size of an empty shard). Written with pyarrow
    directly, not through a shard writer: an estimate is no record written."""
    from cogalign.expand.writer import EMBEDDED_SCHEMA, SCHEMA, dumps, embed, rows_to_table, to_row

    if not records:
        return 0.0
    if fmt != "parquet":
        return sum(len(dumps(r)) + 1 for r in records) / len(records)
    schema = EMBEDDED_SCHEMA if images is not None else SCHEMA
    rows = [embed(to_row(r), r, data) for r, data in zip(records, images or [None] * len(records))]
    full, empty = _parquet_bytes(rows_to_table(rows, schema)), _parquet_bytes(schema.empty_table())
    return max(0.0, (full - empty) / len(records))


def write_seconds(records: list, fmt: str, images: list | None = None) -> float:
    """Seconds a shard worker spends serialising and compressing one of these records: a warm write
    (Arrow's and zstd's first-use cost, paid once per worker, left out)."""
    import time

    if not records:
        return 0.0
    format_bytes(records[:1], fmt, images[:1] if images else None)  # warm-up
    started = time.perf_counter()
    format_bytes(records, fmt, images)
    return (time.perf_counter() - started) / len(records)


def output_bytes(fmt: str, *, expand: int, passed: int, expand_input_bytes: int, passed_input_bytes: int,
                 samples: dict, shards: int) -> int:
    """Bytes `expand` writes under data/ (plus the merged LLaVA file for json/jsonl).

    `*_input_bytes` are the compact JSON sizes of the records as read; `samples` holds
    real records built from the input: `expanded` (finished), `expanded_input` (the same
    records as read) and `passed`. JSON lines are sized exactly but for the new turns,
    whose mean comes from the samples; parquet is sized from the samples compressed."""
    if fmt != "parquet":
        growth = format_bytes(samples["expanded"], fmt) - format_bytes(samples["expanded_input"], fmt)
        lines = expand_input_bytes + passed_input_bytes + expand * growth
        merged = lines + (expand + passed) + 4 if fmt == "json" else lines  # ",\n" in place of "\n", brackets
        return int(lines + merged)
    from cogalign.expand.writer import SCHEMA

    per_shard = _parquet_bytes(SCHEMA.empty_table())
    return int(expand * format_bytes(samples["expanded"], fmt, samples.get("images")) + passed * format_bytes(samples["passed"], fmt)
               + shards * per_shard)


def _parquet_bytes(table) -> int:
    """Bytes `table` takes as a zstd-compressed parquet file."""
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sample.parquet"
        pq.write_table(table, path, compression="zstd")
        return path.stat().st_size


def parse_size(text: str) -> int:
    """`512MB`, `1GB`, `300MiB`, `1000000` -> bytes; ValueError for anything else."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?i?[bB]?)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write e.g. 512MB, 1GB or 300MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human_bytes(n: float) -> str:
    """`n` bytes in decimal units (`1.8 MB`)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000


def synthetic_grid(shape: tuple, factor: int, codebook_size: int, seed: int) -> np.ndarray:
    """Indices of the size the encoder would return for a crop of `shape`, uniform over the codebook:
    the VQ text they render has the expected length, without running the encoder."""
    return np.random.default_rng(seed).integers(0, codebook_size, (shape[0] // factor, shape[1] // factor))


def encoder_seconds(tokenizer, shapes: list[tuple]) -> float:
    """Seconds the encoder needs for these crops: its counted FLOPs over the rate of a 3x3
    convolution of its width measured on its device (~30 ms, once), with the CPU's threads
    encoding images side by side. The probe times a norm and a swish with its convolution, as the
    encoder's residual blocks run them, so their cost is in the rate."""
    flops = sum(tokenizer.flops(h, w) for h, w, *_ in shapes)
    return flops / _conv_rate(str(tokenizer.device), tokenizer.encoder.conv_in.out_channels)


_RATES: dict = {}


def _conv_rate(device: str, channels: int) -> float:
    """FLOP/s of the encoder's kind of work on `device` (on the CPU: per image on one thread,
    times the threads, as the tokenizer runs a batch)."""
    import math
    import time

    import torch

    if (device, channels) in _RATES:
        return _RATES[(device, channels)]
    threads = torch.get_num_threads()
    size, reps = 96, 8
    x = torch.randn(1, channels, size, size, device=device)
    weight = torch.randn(channels, channels, 3, 3, device=device)
    norm = torch.nn.GroupNorm(math.gcd(32, channels), channels).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device == "cpu":
        torch.set_num_threads(1)

    def layer():  # a residual block's half: norm, swish, convolution (only the convolution's FLOPs count)
        h = norm(x)
        return torch.nn.functional.conv2d(h * torch.sigmoid(h), weight, padding=1)

    try:
        with torch.inference_mode():
            layer()
            sync()
            times = []
            for _ in range(reps):  # the fastest: a shared machine's other work only adds
                started = time.perf_counter()
                layer()
                sync()
                times.append(time.perf_counter() - started)
            seconds = min(times)
    finally:
        torch.set_num_threads(threads)
    rate = 2 * 9 * channels * channels * size * size / seconds * (threads if device == "cpu" else 1)
    _RATES[(device, channels)] = rate
    return rate


def vq_crop_bytes(options) -> int:
    """The largest VQ crop one record sends to the encoder (the whole working image at most)."""
    if "vq" not in options.targets:
        return 0
    h, w = options.vq_resolution
    return h * w * 3
