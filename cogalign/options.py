"""Options that shape the output of `expand`, with their defaults.

Only these enter the run fingerprint: a resume with different values is refused.
Runtime knobs (batch size, workers, device, ranks) never change the bytes written.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import orjson

from cogalign.errors import CogalignError

TARGET_KINDS = ("vq", "px")
RESIZE_MODES = ("stretch", "pad", "crop")
RESAMPLE_FILTERS = ("bicubic", "bilinear", "lanczos", "nearest", "box", "hamming")
VQ_SCOPES = ("region", "image")
OUTPUT_FORMATS = ("parquet", "jsonl", "json")
VQ_PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default bomb limit


class OptionError(CogalignError, ValueError):
    """An option value is invalid; the message names the option and the fix."""


def parse_resolution(value: str | int | tuple[int, int], option: str = "resolution") -> tuple[int, int]:
    """`672` or `"672"` -> (672, 672); `"448x672"` -> (448, 672) as (H, W)."""
    if isinstance(value, tuple):
        h, w = value
    elif isinstance(value, int):
        h = w = value
    else:
        parts = str(value).lower().replace("×", "x").split("x")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise OptionError(f"--{option} {value!r}: expected N or HxW, e.g. 672 or 448x672") from None
        if len(nums) == 1:
            h = w = nums[0]
        elif len(nums) == 2:
            h, w = nums
        else:
            raise OptionError(f"--{option} {value!r}: expected N or HxW, e.g. 672 or 448x672")
    if h < 1 or w < 1 or h > 8192 or w > 8192:
        raise OptionError(f"--{option} {value!r}: each side must be between 1 and 8192")
    return int(h), int(w)


def parse_list(value: str | tuple[str, ...] | list[str], allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    items = [v for v in items if v]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise OptionError(f"--{option} {','.join(items) or value!r}: choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class ExpandOptions:
    """Everything that decides the bytes of the output."""

    targets: tuple[str, ...] = TARGET_KINDS
    regions: tuple[str, ...] = ("upper-left", "upper-right", "lower-left", "lower-right")
    vq: str = "demo"
    vq_resolution: tuple[int, int] = (672, 672)
    px_resolution: tuple[int, int] = (672, 672)
    vq_scope: str = "region"
    resize: str = "stretch"
    resample: str = "bicubic"
    seed: int = 0
    templates: str | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    allow_absolute_paths: bool = False
    format: str = "parquet"
    # Filled in by the executor, recorded for provenance and resume checks.
    tokenizer_name: str = ""
    tokenizer_hash: str = ""
    templates_hash: str = ""
    # How the VQ encoder runs (indices can differ between modes, so they are part of the output).
    vq_precision: str = "fp32"
    vq_channels_last: bool = False
    vq_compile: bool = False

    def __post_init__(self) -> None:
        parse_list(self.targets, TARGET_KINDS, "targets")
        for name, allowed in (("resize", RESIZE_MODES), ("resample", RESAMPLE_FILTERS),
                              ("vq_scope", VQ_SCOPES), ("format", OUTPUT_FORMATS)):
            if getattr(self, name) not in allowed:
                raise OptionError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: choose from {', '.join(allowed)}")
        if self.max_image_pixels < 1:
            raise OptionError("--max-image-pixels must be positive")
        if self.vq_precision not in VQ_PRECISIONS:
            raise OptionError(f"--precision {self.vq_precision!r}: choose from {', '.join(VQ_PRECISIONS)}")

    def replace(self, **changes) -> "ExpandOptions":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def fingerprint(self) -> str:
        """Hash of every output-shaping option (the tokenizer by content hash, not by path)."""
        d = self.to_dict()
        d.pop("vq")  # a path may move; the content hash is what matters
        d.pop("templates")
        return hashlib.sha256(orjson.dumps(d, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
