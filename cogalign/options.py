"""Options that shape the output of `expand`, with their defaults.

Only these enter the run fingerprint: a resume with different values is refused.
Runtime knobs (batch size, workers, device, ranks) never change the bytes written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import operator
from dataclasses import dataclass

import orjson

from cogalign.errors import OptionError, cli_flag

__all__ = ["ExpandOptions", "parse_resolution", "parse_list", "TARGET_KINDS", "RESIZE_MODES", "RESAMPLE_FILTERS",
           "VQ_SCOPES", "OUTPUT_FORMATS", "VQ_PRECISIONS", "DEFAULT_MAX_IMAGE_PIXELS", "MAX_SEED", "check_bools"]

TARGET_KINDS = ("vq", "px")
RESIZE_MODES = ("stretch", "pad", "crop")
RESAMPLE_FILTERS = ("bicubic", "bilinear", "lanczos", "nearest", "box", "hamming")
VQ_SCOPES = ("region", "image")
OUTPUT_FORMATS = ("parquet", "jsonl", "json")
VQ_PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default bomb limit
MAX_SEED = 2**63 - 1  # recorded in every record's provenance as a 64-bit integer



def parse_resolution(value: str | int | tuple[int, int], option: str = "resolution") -> tuple[int, int]:
    """`672` or `"672"` -> (672, 672); `"448x672"` or `(448, 672)` -> (448, 672) as (H, W)."""
    if isinstance(value, bool):
        raise OptionError(f"--{option} {value!r}: expected N or HxW, e.g. 672 or 448x672")
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise OptionError(f"--{option} {value!r}: expected two integers (H, W), e.g. (448, 672)")
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
    """`"vq,px"`, `"px"` or `("vq", "px")` -> a tuple of allowed names, duplicates dropped."""
    if not isinstance(value, (str, tuple, list)) or not all(isinstance(v, str) for v in value):
        raise OptionError(f"--{option} {value!r}: give a comma-separated string or a list of {', '.join(allowed)}")
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [v.strip() for v in value]
    items = [v for v in items if v]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise OptionError(f"--{option} {','.join(items) or value!r}: choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class ExpandOptions:
    """Everything that decides the bytes of the output.

    Strings are accepted where the CLI takes them and normalised in the constructor:
    `targets="px"` -> ("px",), `regions="quarters"` -> the four quarters,
    `vq_resolution=448` or `"448x672"` -> (H, W). Bad values raise `OptionError`.
    """

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
    embed_images: bool = False  # parquet: the image column holds the image file's bytes (datasets Image)
    # How the VQ encoder runs (indices can differ between modes, so they are part of the output).
    vq_precision: str = "fp32"
    vq_channels_last: bool = False
    vq_compile: bool = False

    def __post_init__(self) -> None:
        from cogalign.targets.regions import check_regions, parse_regions

        normal = {"targets": parse_list(self.targets, TARGET_KINDS, "targets"),
                  "regions": parse_regions(self.regions),
                  "vq_resolution": parse_resolution(self.vq_resolution, "vq-resolution"),
                  "px_resolution": parse_resolution(self.px_resolution, "px-resolution")}
        for name, value in normal.items():
            object.__setattr__(self, name, value)  # frozen: normalise once, here
        try:
            seed = operator.index(self.seed)  # numpy integers too, not floats or strings
        except TypeError:
            seed = -1
        if isinstance(self.seed, bool) or not 0 <= seed <= MAX_SEED:
            raise OptionError(f"--seed {self.seed!r}: must be an integer from 0 to {MAX_SEED}")
        object.__setattr__(self, "seed", seed)
        if "px" in self.targets:  # the VQ regions are checked once the tokenizer's factor is known
            check_regions(self.regions, self.px_resolution, 1, "px-resolution")
        for name, allowed in (("resize", RESIZE_MODES), ("resample", RESAMPLE_FILTERS),
                              ("vq_scope", VQ_SCOPES), ("format", OUTPUT_FORMATS)):
            if getattr(self, name) not in allowed:
                raise OptionError(f"{cli_flag(name)} {getattr(self, name)!r}: choose from {', '.join(allowed)}")
        check_bools(self, ("allow_absolute_paths", "embed_images", "vq_channels_last", "vq_compile"))
        if self.embed_images and self.format != "parquet":
            raise OptionError(f"--embed-images needs --format parquet (got {self.format!r}): "
                              "LLaVA JSON files hold image paths, not bytes")
        if isinstance(self.max_image_pixels, bool) or not isinstance(self.max_image_pixels, int) \
                or not 1 <= self.max_image_pixels <= MAX_SEED:
            raise OptionError(f"--max-image-pixels {self.max_image_pixels!r}: must be an integer from 1 to {MAX_SEED} "
                              f"(default {DEFAULT_MAX_IMAGE_PIXELS})")
        if self.vq_precision not in VQ_PRECISIONS:
            raise OptionError(f"--precision {self.vq_precision!r}: choose from {', '.join(VQ_PRECISIONS)}")

    def replace(self, **changes) -> "ExpandOptions":
        """A copy with `changes` applied, normalised and checked again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field as JSON-ready values (tuples as lists), as the manifest and report record them."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def fingerprint(self) -> str:
        """Hash of every output-shaping option (the tokenizer by content hash, not by path)."""
        d = self.to_dict()
        d.pop("vq")  # a path may move; the content hash is what matters
        d.pop("tokenizer_name")  # hf://alice/tok and its folder on disk: the same hash is the same tokenizer
        d.pop("templates")
        return hashlib.sha256(orjson.dumps(d, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def check_bools(obj, names) -> None:
    """Refuse a non-bool in any of `obj`'s fields `names` ("false" is truthy: refuse, never guess)."""
    for name in names:
        if not isinstance(getattr(obj, name), bool):
            raise OptionError(f"{cli_flag(name)} {getattr(obj, name)!r}: give True or False")
