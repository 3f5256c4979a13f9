import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from cogalign.targets.render import (RGB_END, RGB_START, VQ_END, VQ_START, parse_px, parse_vq, px_list_text, px_text,
                             vq_list_text, vq_text)


def reference(pixels):
    return str(np.asarray(pixels).reshape(-1, 3).tolist())


@pytest.mark.parametrize("shape", [(1, 1, 3), (0, 3), (0, 5, 3), (1, 3), (2, 3, 3), (7, 3), (31, 17, 3), (64, 64, 3)])
def test_px_matches_str_tolist(shape):
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    assert px_list_text(pixels) == reference(pixels)


def test_px_every_value_in_every_channel():
    values = np.arange(256, dtype=np.uint8)
    pixels = np.stack([values, values[::-1], np.roll(values, 77)], axis=-1)
    assert px_list_text(pixels) == reference(pixels)
    grid = np.stack(np.meshgrid(values, values, indexing="ij"), axis=-1).reshape(-1, 2)
    pixels = np.concatenate([grid, grid[:, :1]], axis=1).astype(np.uint8)
    assert px_list_text(pixels) == reference(pixels)


def test_px_non_contiguous_crops():
    image = np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    for crop in (image[5:20, 7:33], image[::3, 1::2], image[::-1, ::-1], image[:, :, ::-1], image[10:11, 4:5],
                 np.transpose(image, (1, 0, 2))):
        assert not crop.flags.c_contiguous or crop.size == 3
        assert px_list_text(crop) == reference(crop)


@pytest.mark.parametrize("dtype", [np.uint16, np.int8, np.int64, np.float32])
def test_px_refuses_what_parse_px_cannot_read_back(dtype):
    """issue 17 #9: px_text wrote uint16 300 and int8 -1, which parse_px refuses. Only uint8 is
    written now; the one-line error names the dtype and the conversion."""
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else np.finfo(dtype)
    bad = np.array([[0, 5, 7], [min(info.max, 300), 42, max(info.min, -1)]], dtype=dtype)
    for fn in (px_text, px_list_text):
        with pytest.raises(ValueError) as ei:
            fn(bad)
        msg = str(ei.value)
        assert f"got {np.dtype(dtype)}" in msg and "uint8" in msg and "rescale" in msg and "\n" not in msg
    fine = np.array([[0, 5, min(info.max, 255)], [10, 42, 9]], dtype=dtype)  # in range, still refused: the dtype is the contract
    with pytest.raises(ValueError, match="values are in 0..255: convert with x"):
        px_text(fine)
    fix = str(pytest.raises(ValueError, px_text, fine).value).rsplit("convert with ", 1)[1]
    converted = eval(fix, {"np": np, "x": fine})  # the suggested conversion works as written
    assert converted.dtype == np.uint8
    np.testing.assert_array_equal(parse_px(px_text(converted)), fine.reshape(-1, 3).astype(np.int64))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_px_floats_in_0_1_are_told_to_scale_by_255(dtype):
    """Floats in [0, 1] (a normalised image) were told `x.round().astype(np.uint8)`: that conversion,
    done as written, turns the image into 0s and 1s (near black)."""
    image = np.random.default_rng(0).random((4, 5, 3)).astype(dtype)
    with pytest.raises(ValueError) as info:
        px_text(image)
    fix = str(info.value).rsplit("convert with ", 1)[1]
    converted = eval(fix, {"np": np, "x": image})
    assert converted.dtype == np.uint8 and converted.max() > 200
    np.testing.assert_array_equal(converted, (image * 255).round().astype(np.uint8))


def test_px_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        px_list_text(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        px_list_text(np.zeros((2, 3), np.float32))


def test_px_text_wrapping_matches_table6_format():
    pixels = np.array([[[205, 203, 191], [203, 201, 189]]], np.uint8)
    assert px_text(pixels) == "<rgb start>[[205, 203, 191], [203, 201, 189]]<rgb end>"
    assert px_text(pixels).startswith(RGB_START) and px_text(pixels).endswith(RGB_END)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, max_side=12).map(lambda s: s[:2] + (3,))),
       st.data())
def test_px_round_trip_and_identity(pixels, data):
    step_y = data.draw(st.sampled_from([1, 2, -1]))
    step_x = data.draw(st.sampled_from([1, 3, -1]))
    view = pixels[::step_y, ::step_x]
    assert px_list_text(view) == reference(view)
    np.testing.assert_array_equal(parse_px(px_text(view)), view.reshape(-1, 3))
    assert parse_px(px_text(view)).dtype == np.uint8


def test_vq_text_format():
    grid = np.array([[3492, 3492], [532, 901]])
    assert vq_list_text(grid) == "3492, 3492, 532, 901"
    assert vq_text(grid) == "<vq start>3492, 3492, 532, 901<vq end>"
    assert vq_text(grid).startswith(VQ_START) and vq_text(grid).endswith(VQ_END)
    assert vq_list_text(np.array([7])) == "7"
    assert vq_list_text(np.zeros((0,), np.int64)) == ""
    assert vq_list_text(grid.T) == "3492, 532, 3492, 901"
    with pytest.raises(ValueError, match="integer"):
        vq_list_text(np.array([1.5]))


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(st.sampled_from([np.int64, np.int32, np.uint16]), hnp.array_shapes(min_dims=1, max_dims=2, max_side=20),
                  elements=st.integers(0, 16383)))
def test_vq_round_trip(indices):
    text = vq_list_text(indices)
    assert text == ", ".join(str(v) for v in indices.reshape(-1).tolist())
    parsed = parse_vq(vq_text(indices))
    assert parsed.dtype == np.int64
    np.testing.assert_array_equal(parsed, indices.reshape(-1))
    np.testing.assert_array_equal(parse_vq(vq_text(indices.T)), indices.T.reshape(-1))


def test_parsers_accept_empty():
    assert parse_px("<rgb start>[]<rgb end>").shape == (0, 3)
    assert parse_vq("<vq start><vq end>").shape == (0,)


@pytest.mark.parametrize("text", [
    "[[1, 2, 3]]",
    "<rgb start>[[1, 2, 3]]",
    "<rgb start>[[1, 2, 3]<rgb end>",
    "<rgb start>[[1, 2]]<rgb end>",
    "<rgb start>[1, 2, 3]<rgb end>",
    "<rgb start>[[1, 2, 256]]<rgb end>",
    "<rgb start>[[1, -2, 3]]<rgb end>",
    "<rgb start>[[1, 2.5, 3]]<rgb end>",
    "<rgb start>[[1, [2], 3]]<rgb end>",
    "<rgb start>[[1, 2, 3],]<rgb end>",
    "<rgb start>[[true, 2, 3]]<rgb end>",
    "<rgb start>7<rgb end>",
    "<rgb start><rgb end>",
])
def test_parse_px_malformed(text):
    with pytest.raises(ValueError, match="RGB text"):
        parse_px(text)


@pytest.mark.parametrize("text", [
    "3492, 532",
    "<vq start>3492, 532",
    "<vq start>3492,, 532<vq end>",
    "<vq start>3492, 532,<vq end>",
    "<vq start>[3492, 532]<vq end>",
    "<vq start>3492, -1<vq end>",
    "<vq start>3492, 1.0<vq end>",
    "<vq start>3492 532<vq end>",
    "<vq start>99999999999999999999999<vq end>",
])
def test_parse_vq_malformed(text):
    with pytest.raises(ValueError, match="VQ text"):
        parse_vq(text)
