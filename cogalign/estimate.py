"""Size estimates: target text length, output bytes, and the shard size that keeps shards Hub-sized."""
from __future__ import annotations

from cogalign.regions import region_box

SHARD_TARGET_BYTES = 256 * 1024 * 1024  # the Hub asks for shards under ~500 MB uncompressed
MAX_SHARD_RECORDS = 10_000
TURN_OVERHEAD = 400  # prompt, hint and provenance per turn, in characters


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
    return sum(target_chars(options, tokenizer).values()) + TURN_OVERHEAD * len(options.targets) + 1000


def auto_shard_size(options, tokenizer=None) -> int:
    return max(1, min(MAX_SHARD_RECORDS, SHARD_TARGET_BYTES // record_bytes(options, tokenizer)))
