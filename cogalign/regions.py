"""Named image regions (spec §2): boxes aligned to a grid, their phrases, and sampling.

A box is `(x0, y0, x1, y1)` in working-image pixels, end-exclusive. Every edge of a
box is a multiple of `align` (the VQ tokenizer's downsampling factor `f`; 1 for RGB).
When a side has an odd number of `align` cells, halves and quarters split it at
the floor of the middle, and the centre keeps equal margins (the middle half,
rounded to whole cells).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cogalign.options import OptionError

QUARTERS = ("upper-left", "upper-right", "lower-left", "lower-right")
HALVES = ("left", "right", "upper", "lower")
REGION_NAMES = ("full",) + QUARTERS + HALVES + ("center", "box")
REGION_GROUPS = {"quarters": QUARTERS, "halves": HALVES, "all": REGION_NAMES}


@dataclass(frozen=True)
class Region:
    """A named box of the working image."""

    name: str
    box: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        if self.name not in REGION_NAMES:
            raise ValueError(f"unknown region {self.name!r}; choose from {', '.join(REGION_NAMES)}")
        x0, y0, x1, y1 = self.box
        if not (0 <= x0 < x1 and 0 <= y0 < y1):
            raise ValueError(f"region {self.name!r}: empty or negative box {self.box}")

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]

    def phrase(self) -> str:
        """The words that replace "this image" in a template."""
        if self.name == "full":
            return "this image"
        if self.name in QUARTERS:
            return f"the {self.name.replace('-', ' ')} quarter of this image"
        if self.name in HALVES:
            return f"the {self.name} half of this image"
        if self.name == "center":
            return "the central part of this image"
        x0, y0, x1, y1 = self.box
        return f"the region from ({x0}, {y0}) to ({x1}, {y1}) of this image"

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The region's pixels of an (H, W, ...) array (a view, not a copy)."""
        x0, y0, x1, y1 = self.box
        return image[y0:y1, x0:x1]


def parse_regions(spec: str | Sequence[str], option: str = "regions") -> tuple[str, ...]:
    """`"upper-left"`, `"quarters"`, `"halves"`, `"all"` or a comma list of those -> region names."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [item.strip() for item in items if item.strip()]
    valid = ", ".join(REGION_NAMES + tuple(REGION_GROUPS))
    if not items:
        raise OptionError(f"--{option} {spec!r}: no region given; choose from {valid}")
    names: list[str] = []
    for item in items:
        if item in REGION_GROUPS:
            names.extend(REGION_GROUPS[item])
        elif item in REGION_NAMES:
            names.append(item)
        else:
            raise OptionError(f"--{option}: unknown region {item!r}; choose from {valid}")
    return tuple(dict.fromkeys(names))


def _cells(size: int, align: int, axis: str) -> int:
    if align < 1:
        raise OptionError(f"alignment must be a positive integer, got {align}")
    if size < 1 or size % align:
        raise OptionError(f"image {axis} {size} is not a positive multiple of the alignment {align}; "
                          f"choose a working resolution divisible by {align}")
    return size // align


def _halves(cells: int) -> tuple[tuple[int, int], tuple[int, int]]:
    mid = cells // 2
    return (0, max(mid, 1)), (min(mid, cells - 1), cells)


def _middle(cells: int) -> tuple[int, int]:
    margin = min((cells + 2) // 4, (cells - 1) // 2)
    return margin, cells - margin


def region_box(name: str, height: int, width: int, align: int = 1) -> tuple[int, int, int, int]:
    """The aligned box of a named region ("box" is random: use `sample_region`)."""
    rows, cols = _cells(height, align, "height"), _cells(width, align, "width")
    (top, bottom), (left, right) = _halves(rows), _halves(cols)
    spans = {
        "full": ((0, cols), (0, rows)),
        "upper-left": (left, top), "upper-right": (right, top),
        "lower-left": (left, bottom), "lower-right": (right, bottom),
        "left": (left, (0, rows)), "right": (right, (0, rows)),
        "upper": ((0, cols), top), "lower": ((0, cols), bottom),
        "center": (_middle(cols), _middle(rows)),
    }
    if name not in spans:
        hint = " ('box' is drawn at random: use sample_region)" if name == "box" else ""
        raise OptionError(f"unknown fixed region {name!r}{hint}; choose from {', '.join(spans)}")
    (x0, x1), (y0, y1) = spans[name]
    return x0 * align, y0 * align, x1 * align, y1 * align


def _random_span(rng: np.random.Generator, cells: int) -> tuple[int, int]:
    a, b = sorted(int(v) for v in rng.choice(cells + 1, size=2, replace=False))
    return a, b


def sample_region(rng: np.random.Generator, names: Sequence[str], height: int, width: int,
                  align: int = 1) -> Region:
    """Draw a region name uniformly from `names`; "box" draws a random aligned box (x first, then y)."""
    if not names:
        raise OptionError("no region to sample from; give at least one region name")
    name = names[int(rng.integers(len(names)))]
    if name != "box":
        return Region(name, region_box(name, height, width, align))
    rows, cols = _cells(height, align, "height"), _cells(width, align, "width")
    x0, x1 = _random_span(rng, cols)
    y0, y1 = _random_span(rng, rows)
    return Region("box", (x0 * align, y0 * align, x1 * align, y1 * align))
