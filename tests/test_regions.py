import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cogalign.options import parse_resolution
from cogalign.errors import OptionError
from cogalign.targets.regions import (HALVES, MIN_CELLS, QUARTERS, REGION_NAMES, Region, check_regions, parse_regions,
                              region_box, sample_region)

FIXED = tuple(n for n in REGION_NAMES if n != "box")


def test_boxes_at_672_align_8():
    expected = {
        "full": (0, 0, 672, 672),
        "upper-left": (0, 0, 336, 336), "upper-right": (336, 0, 672, 336),
        "lower-left": (0, 336, 336, 672), "lower-right": (336, 336, 672, 672),
        "left": (0, 0, 336, 672), "right": (336, 0, 672, 672),
        "upper": (0, 0, 672, 336), "lower": (0, 336, 672, 672),
        "center": (168, 168, 504, 504),
    }
    assert {n: region_box(n, 672, 672, 8) for n in FIXED} == expected


def test_boxes_non_square_and_odd_sizes():
    assert region_box("upper-right", 448, 672, 16) == (336, 0, 672, 224)
    assert region_box("left", 5, 7, 1) == (0, 0, 3, 5)
    assert region_box("right", 5, 7, 1) == (3, 0, 7, 5)
    assert region_box("lower", 5, 7, 1) == (0, 2, 7, 5)
    assert region_box("center", 5, 7, 1) == (2, 1, 5, 4)
    assert region_box("center", 24, 40, 8) == (8, 8, 32, 16)
    assert region_box("center", 24, 24, 8) == (8, 8, 16, 16)  # 3 cells: margins of one cell
    assert region_box("left", 8, 16, 8) == (0, 0, 8, 8) and region_box("upper", 16, 8, 8) == (0, 0, 8, 8)


@pytest.mark.parametrize("name, height, width, align, fix", [
    ("upper-left", 8, 64, 8, "resolution=16x64"),      # one row of cells: no upper/lower split
    ("lower-right", 8, 8, 8, "resolution=16"),
    ("lower-right", 1, 1, 1, "resolution=2"),
    ("left", 64, 8, 8, "resolution=64x16"),
    ("upper", 1, 64, 1, "resolution=2x64"),
    ("center", 16, 16, 8, "resolution=24"),            # 2 cells: margins would leave nothing
    ("center", 64, 16, 16, "resolution=64x48"),
])
def test_regions_that_cannot_be_cut_are_refused(name, height, width, align, fix):
    """Spec §2: a region too small for the grid is refused, never labelled as something it is not."""
    with pytest.raises(OptionError, match=f"{name} cannot be cut.*use {fix} or larger"):
        region_box(name, height, width, align)
    with pytest.raises(OptionError, match=f"drop {name} from regions"):
        check_regions([name, "full"], (height, width), align)
    with pytest.raises(OptionError, match="cannot be cut"):
        sample_region(np.random.default_rng(0), [name], height, width, align)
    check_regions(["full", "box"], (height, width), align)  # one cell is always enough for these


def test_check_regions_suggests_a_resolution_that_works():
    with pytest.raises(OptionError) as err:
        check_regions(REGION_NAMES, (16, 8), 8, "vq-resolution")
    fix = str(err.value).split("use vq_resolution=")[1].split()[0]
    assert fix == "24"
    h, w = parse_resolution(fix)
    check_regions(REGION_NAMES, (h, w), 8, "vq-resolution")
    with pytest.raises(OptionError, match="vq_resolution=12x20 is not a multiple.*16x24"):
        check_regions(["full"], (12, 20), 8, "vq-resolution")


@settings(max_examples=150, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), align=st.sampled_from([1, 2, 8, 14, 16]))
def test_box_invariants(rows, cols, align):
    height, width = rows * align, cols * align
    cuttable = [n for n in FIXED if MIN_CELLS[n][0] <= cols and MIN_CELLS[n][1] <= rows]
    for name in set(FIXED) - set(cuttable):
        with pytest.raises(OptionError, match="cannot be cut"):
            region_box(name, height, width, align)
    boxes = {n: region_box(n, height, width, align) for n in cuttable}
    for name, (x0, y0, x1, y1) in boxes.items():
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, name
        assert all(v % align == 0 for v in (x0, y0, x1, y1)), name
        assert x1 - x0 >= align and y1 - y0 >= align
    if rows >= 2 and cols >= 2:
        assert sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in (boxes[q] for q in QUARTERS)) == height * width
        assert boxes["left"][2] == boxes["right"][0] == boxes["upper-left"][2]
        assert boxes["upper"][3] == boxes["lower"][1] == boxes["upper-left"][3]
    for name, box in boxes.items():  # no region is the whole image unless it is "full"
        assert name == "full" or box != (0, 0, width, height), name
    if "center" in boxes:
        x0, y0, x1, y1 = boxes["center"]
        assert x0 == width - x1 and y0 == height - y1 and x0 >= align and y0 >= align
        assert abs((x1 - x0) - width / 2) <= align and abs((y1 - y0) - height / 2) <= align


def test_region_box_errors():
    with pytest.raises(OptionError, match="multiple of the alignment 8"):
        region_box("full", 100, 96, 8)
    with pytest.raises(OptionError, match="random"):
        region_box("box", 64, 64, 8)
    with pytest.raises(OptionError, match="unknown"):
        region_box("middle", 64, 64)


def test_phrases():
    assert Region("full", (0, 0, 4, 4)).phrase() == "this image"
    assert Region("upper-left", (0, 0, 2, 2)).phrase() == "the upper left quarter of this image"
    assert Region("lower-right", (2, 2, 4, 4)).phrase() == "the lower right quarter of this image"
    assert Region("left", (0, 0, 2, 4)).phrase() == "the left half of this image"
    assert Region("upper", (0, 0, 4, 2)).phrase() == "the upper half of this image"
    assert Region("center", (1, 1, 3, 3)).phrase() == "the central part of this image"
    assert Region("box", (8, 16, 24, 40)).phrase() == "the region from (8, 16) to (24, 40) of this image"
    for name in REGION_NAMES:
        assert Region(name, (0, 0, 1, 1)).phrase().count("this image") == 1


def test_region_geometry_and_crop():
    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    region = Region("box", (2, 1, 5, 4))
    assert (region.width, region.height) == (3, 3)
    np.testing.assert_array_equal(region.crop(image), image[1:4, 2:5])
    with pytest.raises(ValueError):
        Region("box", (3, 0, 3, 4))
    with pytest.raises(ValueError):
        Region("corner", (0, 0, 1, 1))


def test_parse_regions():
    assert parse_regions("upper-left") == ("upper-left",)
    assert parse_regions("quarters") == QUARTERS
    assert parse_regions("halves") == HALVES
    assert parse_regions("all") == REGION_NAMES
    assert parse_regions("full, left,full") == ("full", "left")
    assert parse_regions(["center", "quarters"]) == ("center",) + QUARTERS
    with pytest.raises(OptionError) as err:
        parse_regions("full,middle")
    assert "'middle'" in str(err.value) and "upper-left" in str(err.value) and "quarters" in str(err.value)
    with pytest.raises(OptionError):
        parse_regions(" , ")


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), rows=st.integers(1, 30), cols=st.integers(1, 30),
       align=st.sampled_from([1, 4, 8, 16]))
def test_sampled_box_in_bounds_and_aligned(seed, rows, cols, align):
    region = sample_region(np.random.default_rng(seed), ["box"], rows * align, cols * align, align)
    x0, y0, x1, y1 = region.box
    assert region.name == "box"
    assert 0 <= x0 < x1 <= cols * align and 0 <= y0 < y1 <= rows * align
    assert all(v % align == 0 for v in region.box)


def test_sample_region_uniform_and_deterministic():
    rng = np.random.default_rng(0)
    names = [sample_region(rng, QUARTERS, 672, 672, 8).name for _ in range(400)]
    counts = [names.count(q) for q in QUARTERS]
    assert all(70 < c < 130 for c in counts), counts
    a = [sample_region(np.random.default_rng(5), REGION_NAMES, 64, 64, 8) for _ in range(2)]
    assert a[0] == a[1]
    corners = {sample_region(np.random.default_rng(s), ["box"], 2, 2, 1).box for s in range(200)}
    assert corners == {(x0, y0, x1, y1) for x0, x1 in ((0, 1), (0, 2), (1, 2)) for y0, y1 in ((0, 1), (0, 2), (1, 2))}
    with pytest.raises(OptionError):
        sample_region(np.random.default_rng(0), [], 8, 8)
