"""cogalign.inputs.images: path resolution, decoding to RGB, working image."""
from __future__ import annotations

import builtins
import io
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from cogalign.errors import RecordError
from cogalign.inputs.images import (
    LLAVA_PAD_COLOR,
    RESAMPLE,
    load_image,
    resolve_image_path,
    to_rgb,
    to_working,
)
from cogalign.options import RESAMPLE_FILTERS
from cogalign.errors import OptionError
from cogalign.inputs.records import REJECT_REASONS, check_record, iter_records

from corpus import BOMB_SIZE, constant_png_bytes, image_root, make_bad_corpus, mode_images, noise_rgb

pytestmark = pytest.mark.filterwarnings("error")  # no PIL warning (bomb, palette transparency...) may fire


def px(im: Image.Image, xy=(0, 0)):
    return im.getpixel(xy)


def one(mode: str, value) -> Image.Image:
    return Image.new(mode, (1, 1), value)


def reject(fn, *args, **kw) -> RecordError:
    with pytest.raises(RecordError) as info:
        fn(*args, **kw)
    return info.value


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    path, expected = make_bad_corpus(root)
    return root, path, expected


# ------------------------------------------------------------------- to_rgb rules

@pytest.mark.parametrize(
    "mode, value, rgb",
    [
        ("RGB", (1, 2, 3), (1, 2, 3)),
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent -> white
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),  # round(255 * (1 - 128/255))
        ("RGBA", (10, 20, 30, 254), (11, 21, 31)),
        ("RGBa", (100, 0, 0, 128), (227, 127, 127)),  # premultiplied: 100 + 127
        ("LA", (0, 0), (255, 255, 255)),
        ("LA", (100, 255), (100, 100, 100)),
        ("LA", (0, 128), (127, 127, 127)),
        ("La", (100, 128), (227, 227, 227)),
        ("PA", (0, 0), (255, 255, 255)),
        ("1", 1, (255, 255, 255)),
        ("1", 0, (0, 0, 0)),
        ("L", 77, (77, 77, 77)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", (255, 0, 0, 0), (0, 255, 255)),
        ("CMYK", (0, 0, 0, 255), (0, 0, 0)),
        ("YCbCr", (255, 128, 128), (255, 255, 255)),
        ("YCbCr", (0, 128, 128), (0, 0, 0)),
        ("HSV", (0, 255, 255), (255, 0, 0)),
        ("RGBX", (1, 2, 3, 4), (1, 2, 3)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 0, (0, 0, 0)),
        ("I;16", 257 * 100, (100, 100, 100)),
        ("I;16", 300, (1, 1, 1)),  # PIL's own convert would clip 300 to 255
        ("I;16B", 65535, (255, 255, 255)),
        ("I;16B", 257 * 42, (42, 42, 42)),
        ("I;16L", 257 * 42, (42, 42, 42)),
        ("F", 0.5, (128, 128, 128)),  # within [0, 1]: x 255
        ("F", 1.0, (255, 255, 255)),
        ("F", 300.0, (255, 255, 255)),
        ("F", 12.4, (12, 12, 12)),  # outside [0, 1]: clip
        ("F", -3.0, (0, 0, 0)),
    ],
)
def test_to_rgb_known_pixel(mode, value, rgb):
    out = to_rgb(one(mode, value))
    assert out.mode == "RGB"
    assert px(out) == rgb


def test_i16_rounding_rule():
    v = np.array([[0, 128, 129, 385, 386, 257 * 255, 65535]], dtype=np.uint16)
    out = np.asarray(to_rgb(Image.fromarray(v)))[..., 0]
    assert out.tolist() == [[0, 0, 1, 1, 2, 255, 255]]  # round(v / 257)
    assert out.tolist() == [[round(int(x) / 257) for x in v[0]]]


def test_i_rule_8bit_range_is_clipped():
    v = np.array([[-5, 0, 100, 255]], dtype=np.int32)
    assert np.asarray(to_rgb(Image.fromarray(v)))[..., 0].tolist() == [[0, 0, 100, 255]]


def test_i_rule_16bit_range_is_scaled():
    v = np.array([[-3, 0, 257, 257 * 200, 65535, 70000]], dtype=np.int32)
    assert np.asarray(to_rgb(Image.fromarray(v)))[..., 0].tolist() == [[0, 0, 1, 200, 255, 255]]


def test_f_rule():
    unit = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    assert np.asarray(to_rgb(Image.fromarray(unit)))[..., 0].tolist() == [[0, 64, 128, 255]]
    wide = np.array([[-3.2, 12.4, 300.0, np.nan, np.inf, -np.inf, 0.5]], dtype=np.float32)
    assert np.asarray(to_rgb(Image.fromarray(wide)))[..., 0].tolist() == [[0, 12, 255, 0, 255, 0, 0]]
    assert np.asarray(to_rgb(Image.fromarray(np.full((1, 2), np.nan, np.float32))))[..., 0].tolist() == [[0, 0]]


def test_palette_with_transparency_index_and_bytes():
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 255, 0])
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 0
    out = to_rgb(im)
    assert [px(out, (0, 0)), px(out, (1, 0))] == [(255, 255, 255), (0, 255, 0)]
    im.info["transparency"] = b"\x00\x80"  # per-entry alpha (PNG tRNS)
    out = to_rgb(im)
    assert [px(out, (0, 0)), px(out, (1, 0))] == [(255, 255, 255), (127, 255, 127)]


def test_palette_without_transparency():
    im = Image.new("P", (1, 1))
    im.putpalette([9, 8, 7])
    assert px(to_rgb(im)) == (9, 8, 7)


def test_grey_and_rgb_trns_chunk(tmp_path):
    grey = Image.new("L", (2, 1), 50)
    grey.putpixel((1, 0), 51)
    grey.save(tmp_path / "l.png", transparency=50)
    out = load_image(tmp_path / "l.png")
    assert [px(out, (0, 0)), px(out, (1, 0))] == [(255, 255, 255), (51, 51, 51)]
    rgb = Image.new("RGB", (2, 1), (1, 2, 3))
    rgb.putpixel((1, 0), (4, 5, 6))
    rgb.save(tmp_path / "rgb.png", transparency=(1, 2, 3))
    out = load_image(tmp_path / "rgb.png")
    assert [px(out, (0, 0)), px(out, (1, 0))] == [(255, 255, 255), (4, 5, 6)]


def test_lab_converts_through_cms():
    white = px(to_rgb(one("LAB", (255, 128, 128))))
    black = px(to_rgb(one("LAB", (0, 128, 128))))
    assert all(c >= 250 for c in white) and all(c <= 5 for c in black)


# --------------------------------------------------------------- load_image files

def test_every_mode_file_loads_to_rgb(corpus):
    root, _, _ = corpus
    for name, (src, _fmt, _kw) in mode_images().items():
        out = load_image(image_root(root) / name)
        assert out.mode == "RGB", name
        assert out.size == src.size, name
        # fully loaded: usable after the file is gone
        assert isinstance(np.asarray(out)[0, 0, 0], np.uint8)


@pytest.mark.parametrize(
    "name",
    ["mode_1.png", "mode_L.png", "mode_P.png", "mode_RGB.png", "mode_RGB.webp", "mode_RGB.bmp",
     "mode_CMYK.tif", "mode_YCbCr.tif", "mode_LA.png", "mode_RGBA.png", "mode_RGBA.webp",
     "mode_P_trns.png", "mode_I16.png", "mode_I16B.tif", "mode_I.tif", "mode_F.tif"],
)
def test_lossless_files_decode_exactly(corpus, name):
    root, _, _ = corpus
    src = mode_images()[name][0]
    if name == "mode_P_trns.png":
        src = src.copy()
        src.info["transparency"] = 0
    expected = np.asarray(to_rgb(src))
    assert np.array_equal(np.asarray(load_image(image_root(root) / name)), expected)


def test_sixteen_bit_png_values(corpus):
    root, _, _ = corpus
    src = np.asarray(mode_images()["mode_I16.png"][0]).astype(np.int64)
    out = np.asarray(load_image(image_root(root) / "mode_I16.png"))
    assert np.array_equal(out[..., 0], (src + 128) // 257)
    assert out.max() > 100  # not clipped to white nor crushed


def test_exif_orientation_6_rotates(corpus):
    root, _, _ = corpus
    path = image_root(root) / "exif_orientation_6.jpg"
    with Image.open(path) as raw:
        assert raw.getexif()[0x0112] == 6
        stored = raw.convert("RGB")
    out = load_image(path)
    assert stored.size == (24, 16) and out.size == (16, 24)
    assert np.array_equal(np.asarray(out), np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_imageops(tmp_path, orientation):
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = orientation
    noise_rgb(6, 4).save(tmp_path / "o.png", exif=exif.tobytes())
    with Image.open(tmp_path / "o.png") as raw:
        expected = ImageOps.exif_transpose(raw).convert("RGB")
    assert np.array_equal(np.asarray(load_image(tmp_path / "o.png")), np.asarray(expected))


def test_animated_gif_first_frame(corpus):
    root, _, _ = corpus
    out = load_image(image_root(root) / "animated.gif")
    assert out.size == (16, 16)
    assert np.all(np.asarray(out) == (255, 0, 0))


def test_format_sniffed_not_extension(corpus):
    root, _, _ = corpus
    gif = load_image(image_root(root) / "gif_named.jpg")
    assert np.all(np.asarray(gif) == (255, 0, 0))
    png = load_image(image_root(root) / "png_named.jpg")
    assert np.array_equal(np.asarray(png), np.asarray(noise_rgb()))


def test_returned_image_is_independent_of_file(tmp_path):
    noise_rgb().save(tmp_path / "x.png")
    out = load_image(tmp_path / "x.png")
    os.remove(tmp_path / "x.png")
    assert np.array_equal(np.asarray(out), np.asarray(noise_rgb()))


# ---------------------------------------------------------------- load rejections

def test_reject_empty_file(corpus):
    root, _, _ = corpus
    err = reject(load_image, image_root(root) / "empty.jpg")
    assert err.reason == "image_empty_file" and "0 bytes" in err.detail


def test_reject_text_named_jpg(corpus):
    root, _, _ = corpus
    err = reject(load_image, image_root(root) / "text.jpg")
    assert err.reason == "image_unidentified"
    assert "cannot identify image file" in err.detail and "text.jpg" in err.detail


def test_reject_truncated_jpeg(corpus):
    root, _, _ = corpus
    err = reject(load_image, image_root(root) / "truncated.jpg")
    assert err.reason == "image_decode_error" and "truncated" in err.detail


def test_reject_corrupt_png(corpus):
    root, _, _ = corpus
    err = reject(load_image, image_root(root) / "corrupt.png")
    assert err.reason == "image_decode_error" and "corrupt.png" in err.detail


def test_reject_missing_file(tmp_path):
    err = reject(load_image, tmp_path / "nope.png")
    assert err.reason == "image_missing" and str(tmp_path / "nope.png") in err.detail
    err = reject(load_image, tmp_path)
    assert err.reason == "image_missing" and "directory" in err.detail


def test_bomb_rejected_from_header_before_decoding(corpus, monkeypatch):
    root, _, _ = corpus

    def no_decode(self, *a, **k):
        raise AssertionError("decoded a bomb")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    before = Image.MAX_IMAGE_PIXELS
    t = time.perf_counter()
    err = reject(load_image, image_root(root) / "bomb.png")
    assert time.perf_counter() - t < 1.0
    assert err.reason == "image_too_large"
    w, h = BOMB_SIZE
    assert f"{w}×{h}" in err.detail and "89,478,485" in err.detail and "raise --max-image-pixels" in err.detail
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize("size", [(10000, 10000), (20000, 20000)])  # PIL would warn / raise for these
def test_bomb_never_raises_pil_warning_or_error(tmp_path, size):
    (tmp_path / "b.png").write_bytes(constant_png_bytes(*size))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        err = reject(load_image, tmp_path / "b.png")
    assert err.reason == "image_too_large"


def test_max_pixels_is_per_call(tmp_path):
    noise_rgb(24, 16).save(tmp_path / "x.png")
    err = reject(load_image, tmp_path / "x.png", max_pixels=383)
    assert err.reason == "image_too_large" and "24×16" in err.detail and "383" in err.detail
    assert load_image(tmp_path / "x.png", max_pixels=384).size == (24, 16)


def test_pil_global_limit_neither_applies_nor_leaks(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 24*16 = 384 > 2*50: PIL alone would raise
    noise_rgb(24, 16).save(tmp_path / "x.png")
    im = load_image(tmp_path / "x.png")
    assert Image.MAX_IMAGE_PIXELS == 50
    assert to_working(im, (8, 8), resize="crop").shape == (8, 8, 3)
    assert Image.MAX_IMAGE_PIXELS == 50
    with pytest.raises(Image.DecompressionBombError):  # PIL's own check still works outside our calls
        Image.open(tmp_path / "x.png")


def test_pil_global_limit_restored_after_concurrent_threads(tmp_path):
    noise_rgb(32, 32).save(tmp_path / "x.png")
    (tmp_path / "bad.jpg").write_text("nope")
    before = Image.MAX_IMAGE_PIXELS
    errors = []

    def work():
        try:
            for _ in range(20):
                load_image(tmp_path / "x.png")
                with pytest.raises(RecordError):
                    load_image(tmp_path / "bad.jpg")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert Image.MAX_IMAGE_PIXELS == before


def _write(data: bytes) -> Path:
    fd, name = tempfile.mkstemp(suffix=".jpg")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


def _samples() -> dict[str, bytes]:
    out = {}
    src = noise_rgb(12, 10, seed=5)
    for fmt, kw in (("PNG", {}), ("JPEG", {}), ("GIF", {}), ("TIFF", {}), ("WEBP", {}), ("BMP", {})):
        buf = io.BytesIO()
        src.save(buf, fmt, **kw)
        out[fmt] = buf.getvalue()
    buf = io.BytesIO()
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out["AGIF"] = buf.getvalue()
    return out


SAMPLES = _samples()


def _only_record_errors(data: bytes) -> None:
    path = _write(data)
    try:
        out = load_image(path)
        assert out.mode == "RGB" and out.size[0] >= 1
    except RecordError as e:
        assert e.reason in {"image_empty_file", "image_unidentified", "image_too_large", "image_decode_error"}
    finally:
        path.unlink()


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_every_truncation_only_raises_record_error(fmt):
    data = SAMPLES[fmt]
    step = max(1, len(data) // 60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plugins may warn about odd files; only exceptions matter here
        for n in list(range(0, len(data), step)) + [len(data) - 1]:
            _only_record_errors(data[:n])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(sorted(SAMPLES)),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_corrupted_bytes_only_raise_record_error(fmt, edits):
    data = bytearray(SAMPLES[fmt])
    for pos, byte in edits:
        data[int(pos * len(data))] = byte
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _only_record_errors(bytes(data))


# --------------------------------------------------------------- path resolution

@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    noise_rgb().save(root / "a.png")
    noise_rgb().save(root / "sub" / "b.png")
    noise_rgb().save(tmp_path / "outside" / "secret.png")
    (root / "out_link.png").symlink_to(tmp_path / "outside" / "secret.png")
    (root / "in_link.png").symlink_to("a.png")
    (root / "out_dir").symlink_to(tmp_path / "outside")
    return root


def test_resolve_plain_and_normalised(tree):
    assert resolve_image_path("a.png", tree) == tree / "a.png"
    assert resolve_image_path("./sub/../a.png", tree) == tree / "a.png"
    assert resolve_image_path("sub//b.png", tree) == tree / "sub" / "b.png"
    assert resolve_image_path("in_link.png", tree) == tree / "in_link.png"


def test_resolve_does_not_open_anything(tree, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("opened a file")

    monkeypatch.setattr(builtins, "open", boom)
    monkeypatch.setattr(os, "open", boom)
    assert resolve_image_path("sub/b.png", tree) == tree / "sub" / "b.png"


def test_resolve_relative_root(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    assert resolve_image_path("a.png", Path("images")) == tree / "a.png"


def test_resolve_root_that_is_a_symlink(tree, tmp_path):
    (tmp_path / "root_link").symlink_to(tree)
    assert resolve_image_path("a.png", tmp_path / "root_link") == tmp_path / "root_link" / "a.png"


@pytest.mark.parametrize("value", ["../outside/secret.png", "sub/../../outside/secret.png", "..", "../images_x/a.png"])
def test_resolve_dotdot_escapes(tree, value):
    err = reject(resolve_image_path, value, tree)
    assert err.reason == "image_path_escapes_root" and str(tree) in err.detail


@pytest.mark.parametrize("value", ["out_link.png", "out_dir/secret.png"])
def test_resolve_symlink_out_escapes(tree, value):
    err = reject(resolve_image_path, value, tree)
    assert err.reason == "image_path_escapes_root" and "symlink" in err.detail


def test_resolve_symlink_out_allowed_with_allow_absolute(tree):
    assert resolve_image_path("out_link.png", tree, allow_absolute=True) == tree / "out_link.png"
    # `..` still is not
    assert reject(resolve_image_path, "../outside/secret.png", tree, allow_absolute=True).reason == "image_path_escapes_root"


@pytest.mark.parametrize("value", ["/etc/passwd", "C:\\data\\x.jpg", "c:/data/x.jpg", "\\\\server\\share\\x.jpg", "\\rooted\\x.jpg", "//server/share/x.jpg"])
def test_resolve_absolute_rejected(tree, value):
    err = reject(resolve_image_path, value, tree)
    assert err.reason == "image_path_absolute" and "--allow-absolute-paths" in err.detail


def test_resolve_absolute_allowed(tree):
    secret = tree.parent / "outside" / "secret.png"
    assert resolve_image_path(str(secret), tree, allow_absolute=True) == secret
    err = reject(resolve_image_path, str(tree.parent / "outside" / "none.png"), tree, allow_absolute=True)
    assert err.reason == "image_missing" and str(tree.parent / "outside" / "none.png") in err.detail


def test_resolve_missing_names_full_path(tree):
    err = reject(resolve_image_path, "coco/train2017/x.jpg", tree)
    assert err.reason == "image_missing"
    assert err.detail == f"no file at {tree}/coco/train2017/x.jpg"


@pytest.mark.parametrize("value, why", [("sub", "directory"), (".", "directory"), ("a.png\x00x", "null byte")])
def test_resolve_not_a_file(tree, value, why):
    err = reject(resolve_image_path, value, tree)
    assert err.reason == "image_missing" and why in err.detail and "\x00" not in err.detail


def test_resolve_broken_symlink_is_missing(tree):
    (tree / "broken.png").symlink_to("nothing.png")
    assert reject(resolve_image_path, "broken.png", tree).reason == "image_missing"


def test_resolve_empty(tree):
    assert reject(resolve_image_path, "", tree).reason == "image_path_empty"


# ------------------------------------------------------------------- to_working

@pytest.mark.parametrize("resize", ["stretch", "pad", "crop"])
@pytest.mark.parametrize("size", [(40, 20), (20, 40), (30, 30), (1, 1)])
def test_working_shape_dtype_contiguous(resize, size):
    arr = to_working(noise_rgb(*size), (8, 12), resize=resize)
    assert arr.shape == (8, 12, 3) and arr.dtype == np.uint8
    assert arr.flags.c_contiguous and arr.flags.writeable


def test_llava_pad_colour():
    assert LLAVA_PAD_COLOR == (122, 116, 104)
    assert LLAVA_PAD_COLOR == tuple(int(x * 255) for x in (0.48145466, 0.4578275, 0.40821073))


def test_pad_is_expand2square_then_resize():
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    arr = to_working(wide, (40, 40), resize="pad", resample="nearest")
    assert np.all(arr[:10] == LLAVA_PAD_COLOR) and np.all(arr[30:] == LLAVA_PAD_COLOR)
    assert np.all(arr[10:30] == (255, 0, 0))
    tall = Image.new("RGB", (11, 20), (0, 255, 0))  # odd difference: offset (20-11)//2 = 4
    arr = to_working(tall, (20, 20), resize="pad")
    assert np.all(arr[:, :4] == LLAVA_PAD_COLOR) and np.all(arr[:, 4:15] == (0, 255, 0)) and np.all(arr[:, 15:] == LLAVA_PAD_COLOR)


def test_pad_matches_llava_expand2square():
    def expand2square(pil_img, background_color):  # verbatim from LLaVA's train.py
        width, height = pil_img.size
        if width == height:
            return pil_img
        elif width > height:
            result = Image.new(pil_img.mode, (width, width), background_color)
            result.paste(pil_img, (0, (width - height) // 2))
            return result
        else:
            result = Image.new(pil_img.mode, (height, height), background_color)
            result.paste(pil_img, ((height - width) // 2, 0))
            return result

    for size in ((37, 20), (20, 37), (25, 25)):
        im = noise_rgb(*size)
        want = np.asarray(expand2square(im, LLAVA_PAD_COLOR).resize((16, 16), Image.Resampling.BICUBIC))
        assert np.array_equal(to_working(im, (16, 16), resize="pad"), want)


def test_crop_is_centre_square():
    im = Image.new("RGB", (30, 10), (0, 0, 255))
    im.paste((255, 0, 0), (10, 0, 20, 10))
    assert np.all(to_working(im, (10, 10), resize="crop") == (255, 0, 0))
    arr = to_working(im, (5, 5), resize="crop", resample="bilinear")
    assert np.all(arr == (255, 0, 0))
    src = noise_rgb(17, 30)
    want = np.asarray(src.crop((0, 6, 17, 23)).resize((9, 9), Image.Resampling.LANCZOS))
    assert np.array_equal(to_working(src, (9, 9), resize="crop", resample="lanczos"), want)


def test_stretch_is_pil_resize_w_h():
    src = noise_rgb(40, 20)
    for name in RESAMPLE_FILTERS:
        want = np.asarray(src.resize((12, 8), RESAMPLE[name]))
        assert np.array_equal(to_working(src, (8, 12), resample=name), want), name


def test_no_resize_when_size_matches():
    src = noise_rgb(12, 8)
    assert np.array_equal(to_working(src, (8, 12)), np.asarray(src))
    sq = noise_rgb(9, 9)
    for resize in ("stretch", "pad", "crop"):
        assert np.array_equal(to_working(sq, (9, 9), resize=resize), np.asarray(sq))


def test_to_working_converts_non_rgb_by_the_same_rules():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.all(to_working(rgba, (4, 4)) == 255)
    i16 = Image.new("I;16", (4, 4), 65535)
    assert np.all(to_working(i16, (2, 2)) == 255)


def test_bad_option_names():
    with pytest.raises(OptionError):
        to_working(noise_rgb(), (8, 8), resize="fit")
    with pytest.raises(OptionError):
        to_working(noise_rgb(), (8, 8), resample="cubic")


# ------------------------------------------------------------- the shared corpus

def _outcome(record, root: Path):
    if isinstance(record, RecordError):
        return "reject", record.reason
    try:
        check = check_record(record)
        if check.action == "pass":
            return "pass", check.pass_reason
        path = resolve_image_path(check.image, image_root(root))
        to_working(load_image(path), (16, 16))
        return "expand", None
    except RecordError as e:
        return "reject", e.reason


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_corpus_outcomes_are_exact(tmp_path, fmt):
    path, expected = make_bad_corpus(tmp_path, fmt=fmt)
    got = [(i, _outcome(rec, tmp_path)) for i, rec in iter_records(path)]
    assert [i for i, _ in got] == [e.index for e in expected] == list(range(len(expected)))
    mismatches = [(e.case, (e.outcome, e.reason), o) for (i, o), e in zip(got, expected) if o != (e.outcome, e.reason)]
    assert mismatches == []
    reasons = {e.reason for e in expected if e.outcome == "reject"}
    # the corpus covers every record-shape reason and every image reason
    # image_conflict comes from the chat-turn conversion (turns.to_llava), which `_outcome` does not run
    assert set(REJECT_REASONS) - {"image_conflict"} - ({"invalid_json"} if fmt == "json" else set()) <= reasons
    assert {"image_path_empty", "image_path_absolute", "image_path_escapes_root", "image_missing", "image_empty_file",
            "image_unidentified", "image_too_large", "image_decode_error"} <= reasons
    assert {"text_only", "video"} <= {e.reason for e in expected if e.outcome == "pass"}


def _canvas_reference(im: Image.Image, size, resample: str) -> np.ndarray:
    side = max(im.size)
    canvas = Image.new("RGB", (side, side), LLAVA_PAD_COLOR)
    canvas.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    return np.asarray(canvas.resize(size, RESAMPLE[resample]))


def _no_big_canvas(monkeypatch, limit: int):
    real_new = Image.new

    def new(mode, size, *args, **kw):
        assert size[0] * size[1] <= limit, f"a {size} image was built"
        return real_new(mode, size, *args, **kw)

    monkeypatch.setattr(Image, "new", new)


@pytest.mark.parametrize("size", [(12000, 8), (8, 12000), (200000, 1), (1, 200000)])
def test_pad_on_extreme_aspect_ratios_builds_no_huge_canvas(monkeypatch, size):
    """Issue 7 item 8: a 12000x8 strip took 1.15 GB; a 200000x1 one was rejected as MemoryError."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    _no_big_canvas(monkeypatch, 4 * 4096 * 4096)
    arr = to_working(im, (32, 48), resize="pad")
    assert arr.shape == (32, 48, 3)
    strip = arr[:, :, :].reshape(-1, 3)
    assert (strip == LLAVA_PAD_COLOR).all(axis=1).mean() > 0.9  # mostly the pad colour, as on the canvas


@pytest.mark.parametrize("resample", RESAMPLE_FILTERS)
def test_pad_without_canvas_matches_the_canvas(monkeypatch, resample):
    """Measured in benchmarks/pad_extreme.py: a wide strip is byte-identical here; a tall one differs
    by the rounding of PIL's intermediate pass (at most 1 level at these sizes)."""
    import cogalign.inputs.images

    rng = np.random.default_rng(1)
    wide = Image.fromarray(rng.integers(0, 256, (20, 1500, 3), dtype=np.uint8))
    want_wide = _canvas_reference(wide, (96, 64), resample)
    want_tall = _canvas_reference(wide.transpose(Image.Transpose.TRANSPOSE), (64, 96), resample)
    monkeypatch.setattr(cogalign.inputs.images, "PAD_CANVAS_PIXELS", 0)  # the canvas-free path from 4x the image on
    _no_big_canvas(monkeypatch, 1500 * 1500 // 4)  # the canvas would be 1500 x 1500
    assert np.array_equal(to_working(wide, (64, 96), resize="pad", resample=resample), want_wide)
    got = to_working(wide.transpose(Image.Transpose.TRANSPOSE), (96, 64), resize="pad", resample=resample)
    diff = np.abs(got.astype(int) - want_tall.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    if resample == "nearest":
        assert diff.max() == 0


def test_validate_and_expand_agree_on_a_200000x1_png(tmp_path):
    from cogalign.expand.validate import validate as run_validate
    from cogalign.options import ExpandOptions
    from cogalign.expand.worker import WorkerContext, prepare

    Image.fromarray(np.full((1, 200000, 3), 7, dtype=np.uint8)).save(tmp_path / "strip.png")
    record = {"id": "strip", "image": "strip.png",
              "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A line."}]}
    (tmp_path / "in.jsonl").write_text(__import__("json").dumps(record) + "\n")
    options = ExpandOptions(targets="px", resize="pad", px_resolution=16)
    assert run_validate(tmp_path / "in.jsonl", options, workers=0, progress=False).ok
    prepared = prepare(0, record, WorkerContext(options, tmp_path))
    assert prepared.outcome == "expand", prepared.detail
