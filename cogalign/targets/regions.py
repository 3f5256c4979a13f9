"""Named image regions (spec §2): boxes aligned to a grid, their phrases, and sampling.

A box is `(x0, y0, x1, y1)` in working-image pixels, end-exclusive. Every edge of a
box is a multiple of `align` (the VQ tokenizer's downsampling factor `f`; 1 for RGB).
When a side has an odd number of `align` cells, halves and quarters split it at
the floor of the middle, and the centre keeps equal margins (the middle half,
rounded to whole cells).

A region is refused (OptionError) where it cannot be cut at the resolution: a half
or quarter needs at least 2 cells along each axis it splits, the centre at least 3
cells in each axis (a margin of one cell and a middle of one cell); `full` and
`box` need one cell. `check_regions` applies this before a run starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cogalign.errors import OptionError

__all__ = ["Region", "parse_regions", "check_regions", "region_box", "sample_region", "QUARTERS", "HALVES",
           "REGION_NAMES", "REGION_GROUPS", "MIN_CELLS"]

QUARTERS = ("upper-left", "upper-right", "lower-left", "lower-right")
HALVES = ("left", "right", "upper", "lower")
REGION_NAMES = ("full",) + QUARTERS + HALVES + ("center", "box")
REGION_GROUPS = {"quarters": QUARTERS, "halves": HALVES, "all": REGION_NAMES}
# Cells (columns, rows) a region needs to be what its phrase says.
MIN_CELLS = {"full": (1, 1), "box": (1, 1), "center": (3, 3),
             **{name: (2, 2) for name in QUARTERS}, "left": (2, 1), "right": (2, 1), "upper": (1, 2), "lower": (1, 2)}
_WHAT = {"center": "the central part needs at least 3 cells in each axis",
         **{name: "a quarter needs at least 2 cells in each axis" for name in QUARTERS},
         "left": "a left/right half needs at least 2 cells across", "right": "a left/right half needs at least 2 cells across",
         "upper": "an upper/lower half needs at least 2 cells down", "lower": "an upper/lower half needs at least 2 cells down"}


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
        """Width of the box in pixels."""
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        """Height of the box in pixels."""
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


def check_regions(names: Sequence[str], resolution: tuple[int, int], align: int = 1,
                  resolution_option: str = "resolution", regions_option: str = "regions") -> None:
    """Refuse, in one line, a region that cannot be cut at `resolution` (H, W) on a grid of `align` px."""
    height, width = resolution
    if align < 1:
        raise OptionError(f"alignment must be a positive integer, got {align}")
    if height < 1 or width < 1 or height % align or width % align:
        up = lambda n: max(align, -(-n // align) * align)  # noqa: E731 - next multiple of align
        raise OptionError(f"--{resolution_option} {height}x{width} is not a multiple of the grid of {align} px "
                          f"(the tokenizer's downsampling factor); use --{resolution_option} {up(height)}x{up(width)}")
    rows, cols = height // align, width // align
    need_cols = max(MIN_CELLS[name][0] for name in names)
    need_rows = max(MIN_CELLS[name][1] for name in names)
    bad = [name for name in names if MIN_CELLS[name][0] > cols or MIN_CELLS[name][1] > rows]
    if not bad:
        return
    h, w = max(height, need_rows * align), max(width, need_cols * align)
    grid = f"{rows}x{cols} cells of {align} px"
    works = f"{h}" if h == w else f"{h}x{w}"
    raise OptionError(f"--{regions_option} {bad[0]} cannot be cut at --{resolution_option} {height}x{width} "
                      f"({grid}; {_WHAT[bad[0]]}): use --{resolution_option} {works} or larger, "
                      f"or drop {', '.join(bad)} from --{regions_option}")


def _halves(cells: int) -> tuple[tuple[int, int], tuple[int, int]]:
    mid = cells // 2
    return (0, mid), (mid, cells)


def _middle(cells: int) -> tuple[int, int]:
    margin = (cells + 2) // 4
    return margin, cells - margin


def region_box(name: str, height: int, width: int, align: int = 1) -> tuple[int, int, int, int]:
    """The aligned box of a named region ("box" is random: use `sample_region`)."""
    rows, cols = _cells(height, align, "height"), _cells(width, align, "width")
    if name in MIN_CELLS:
        check_regions((name,), (height, width), align)
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
