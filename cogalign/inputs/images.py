"""Images: resolve an `image` value safely under the image root, decode any file to
8-bit RGB (spec §1.1), and make the working image (spec §1.2).

Everything that can go wrong with one record's image is reported as a
`RecordError` with a stable reason code:

| reason | when |
|---|---|
| image_path_empty | `image` is "" |
| image_path_absolute | an absolute POSIX path, a Windows drive path (`C:\\`, `C:/`) or a UNC / rooted `\\` path, unless `allow_absolute` |
| image_path_escapes_root | the path leaves the image root, lexically (`..`) or through a symlink |
| image_missing | no regular file at the resolved path (detail: the full path tried) |
| image_empty_file | the file has 0 bytes |
| image_unidentified | the content is not an image format PIL knows (detail: PIL's message) |
| image_too_large | width×height from the header exceeds `max_pixels` (checked before decoding) |
| image_decode_error | truncated or corrupt data, or a mode that cannot be converted (detail: the decoder's message) |

PIL's own decompression-bomb check (`PIL.Image.MAX_IMAGE_PIXELS`) is switched off
only while a `load_image`/`to_working` call is in flight (reference-counted across
threads, restored when the last call finishes) and replaced by our per-call
`max_pixels` check, so `DecompressionBombWarning`/`Error` never fires first and the
limit is the one the user chose (`--max-image-pixels`). In worker processes this is
process-local, so it is safe there; in a threaded program, PIL calls made by *other*
code while a cogalign call is in flight run without PIL's own bomb check.
"""
from __future__ import annotations

import io
import math
import os
import re
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from cogalign.errors import OptionError, RecordError
from cogalign.options import DEFAULT_MAX_IMAGE_PIXELS, RESAMPLE_FILTERS, RESIZE_MODES

__all__ = [
    "IMAGE_REJECT_REASONS",
    "resolve_image_path",
    "load_image",
    "load_image_bytes",
    "load_image_object",
    "to_rgb",
    "to_working",
    "LLAVA_PAD_COLOR",
    "pad_and_resize",
    "RESAMPLE",
    "psnr_db",
]

#: Every reason this module raises (plus "image_bad_type" for a non-string path).
IMAGE_REJECT_REASONS = (
    "image_path_empty",
    "image_path_absolute",
    "image_path_escapes_root",
    "image_missing",
    "image_empty_file",
    "image_unidentified",
    "image_too_large",
    "image_decode_error",
)

# LLaVA's expand2square fills with tuple(int(x * 255) for x in image_processor.image_mean);
# LLaVA's vision tower is CLIP, whose processor mean is (0.48145466, 0.4578275, 0.40821073).
LLAVA_PAD_COLOR: tuple[int, int, int] = tuple(int(x * 255) for x in (0.48145466, 0.4578275, 0.40821073))  # (122, 116, 104)

RESAMPLE: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
assert set(RESAMPLE) == set(RESAMPLE_FILTERS)

# EXIF Orientation tag (0x0112) -> the transpose that undoes it; same table as PIL.ImageOps.exif_transpose.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_WINDOWS_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:[\\/]|[\\/]{2}|\\)")


# --------------------------------------------------------------------------- paths

def _is_absolute(value: str) -> bool:
    return os.path.isabs(value) or bool(_WINDOWS_ABSOLUTE.match(value))


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives (Windows) or mixed absolute/relative
        return False


def resolve_image_path(value: str, image_root: Path, allow_absolute: bool = False) -> Path:
    """Resolve a record's `image` value under `image_root` without opening anything.

    Returns the normalised path (`os.path.normpath(root/value)`; symlinks are not
    replaced). Checks, in order: empty value, absolute path (POSIX absolute,
    `C:\\`/`C:/` drive paths, UNC `\\\\server` and rooted `\\x` paths are all absolute),
    lexical escape (`..`), escape through a symlink (the realpath must stay inside the
    realpath of the root), and that a regular file exists there (one `stat`).

    With `allow_absolute=True` absolute values are used as they are, and symlinks that
    lead out of the root are accepted too (the user has allowed reading outside the
    root); a relative value that climbs out with `..` is still rejected.
    """
    if not isinstance(value, str):
        raise RecordError("image_bad_type", f"image path is {type(value).__name__}, expected a string")
    if value == "":
        raise RecordError("image_path_empty", "the image path is an empty string")
    root = os.path.abspath(os.fspath(image_root))
    if _is_absolute(value):
        if not allow_absolute:
            raise RecordError(
                "image_path_absolute",
                f"{value!r} is absolute; paths must be relative to the image root {root} "
                "(pass --allow-absolute-paths to accept absolute paths)",
            )
        candidate = os.path.normpath(value)
    else:
        candidate = os.path.normpath(os.path.join(root, value))
        if not _inside(candidate, root):
            raise RecordError("image_path_escapes_root", f"{value!r} resolves to {candidate}, outside the image root {root}")
        if not allow_absolute:
            try:
                real = os.path.realpath(candidate)
                real_root = os.path.realpath(root)
            except (OSError, ValueError) as e:  # symlink loop on some Pythons, NUL byte
                raise RecordError("image_missing", f"no file at {_printable(candidate)} ({e})") from None
            if not _inside(real, real_root):
                raise RecordError(
                    "image_path_escapes_root",
                    f"{value!r} resolves through a symlink to {real}, outside the image root {real_root} "
                    "(pass --allow-absolute-paths to follow symlinks out of the root)",
                )
    _require_file(candidate)
    return Path(candidate)


def _printable(path: str) -> str:
    return path.replace("\x00", "\\x00")


def _require_file(path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:  # ValueError: embedded NUL byte
        why = "" if isinstance(e, FileNotFoundError) else f" ({e.strerror if isinstance(e, OSError) and e.strerror else e})"
        raise RecordError("image_missing", f"no file at {_printable(path)}{why}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise RecordError("image_missing", f"no file at {path} ({kind})")
    return st


# ----------------------------------------------------------------- PIL bomb limit

_bomb_lock = threading.Lock()
_bomb_depth = 0
_bomb_saved: int | None = None


@contextmanager
def _pil_bomb_check_off() -> Iterator[None]:
    """Disable PIL's global bomb check while at least one cogalign call is in flight.

    Reference-counted so that overlapping calls in threads never restore it early.
    """
    global _bomb_depth, _bomb_saved
    with _bomb_lock:
        if _bomb_depth == 0:
            _bomb_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _bomb_depth += 1
    try:
        yield
    finally:
        with _bomb_lock:
            _bomb_depth -= 1
            if _bomb_depth == 0:
                Image.MAX_IMAGE_PIXELS = _bomb_saved
                _bomb_saved = None


# ----------------------------------------------------------------------- decoding

def _message(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode the file at `path` into a fully loaded 8-bit RGB image (spec §1.1).

    - The format is sniffed from the content (`PIL.Image.open`); the extension is never
      trusted, so a GIF or PNG named `.jpg` decodes as what it is.
    - `width × height` from the header is checked against `max_pixels` *before* any
      pixel data is decoded (reason `image_too_large`).
    - Animated images (GIF, APNG, WebP, MPO, multi-page TIFF): the first frame.
    - The EXIF orientation is applied (the same transposes as `ImageOps.exif_transpose`);
      an unreadable EXIF block is ignored rather than rejecting a decodable image.
    - Then `to_rgb` converts any mode to 8-bit RGB; see its docstring for the rules.

    Raises `RecordError` (and nothing else) for any bad file.
    """
    path_s = os.fspath(path)
    st = _require_file(path_s)
    if st.st_size == 0:
        raise RecordError("image_empty_file", f"{path_s} is 0 bytes")
    return _decode(path_s, path_s, max_pixels)


def load_image_bytes(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """`load_image` for an image held in memory (e.g. embedded in a parquet input): the same
    format sniffing, bomb check and conversion; `name` stands for the path in messages."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordError("image_bad_type", f"{name}: embedded image is {type(data).__name__}, expected bytes")
    if len(data) == 0:
        raise RecordError("image_empty_file", f"{name} is 0 bytes")
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(source, path_s: str, max_pixels: int) -> Image.Image:
    with _pil_bomb_check_off():
        try:
            im = Image.open(source)
        except FileNotFoundError:
            raise RecordError("image_missing", f"no file at {path_s}") from None
        except Image.UnidentifiedImageError as e:
            raise RecordError("image_unidentified", str(e) if source is path_s else
                              f"cannot identify the embedded image data of {path_s}") from None
        except PermissionError as e:
            raise RecordError("image_decode_error", f"cannot read {path_s}: {e.strerror or e}") from None
        except Exception as e:  # noqa: BLE001 - a plugin choked on the header
            raise RecordError("image_decode_error", f"{path_s}: {_message(e)}") from None
        try:
            return _convert(im, path_s, max_pixels)
        finally:
            im.close()


def _convert(im: Image.Image, path_s: str, max_pixels: int) -> Image.Image:
    """An opened image's first frame, loaded, checked, EXIF-oriented and in RGB (a new image)."""
    try:
        _check_size(im, max_pixels, path_s)
        try:
            im.seek(0)
        except EOFError:
            pass
        im.load()
        _check_size(im, max_pixels, path_s)  # the loaded frame, in case a plugin changed size
        orientation = _orientation(im)
        rgb = to_rgb(im)
        if orientation in _ORIENTATION:
            rgb = rgb.transpose(_ORIENTATION[orientation])
        if rgb is im:
            rgb = im.copy()
        rgb.load()
        return rgb
    except RecordError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, SyntaxError, struct.error, EOFError, MemoryError, ...
        raise RecordError("image_decode_error", f"{path_s}: {_message(e)}") from None


def load_image_object(image, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, image_root: Path | None = None,
                      allow_absolute: bool = False, read_bytes: bool = True) -> tuple[Image.Image, bytes | None]:
    """(8-bit RGB image, the file's bytes or None) for an image given in memory or by path, decoded
    with the same checks and conversion as `load_image` (a file's bytes give the same pixels):

    - a `str`: a record-style path, resolved under `image_root` (`resolve_image_path`);
    - an `os.PathLike` (`pathlib.Path`): a file the caller names, absolute or relative to `image_root`;
    - `bytes`: an image file's content; a `{"bytes", "path"}` dict (`datasets`' Image): its bytes, else its path;
    - a `PIL.Image.Image` (left unchanged; its first frame); a uint8 `numpy` array (H, W), (H, W, 3) RGB
      or (H, W, 4) RGBA.

    Anything else is `RecordError("image_bad_type")`; `name` stands for the image in messages.
    `read_bytes=False`: a file given by path is not read a second time for its bytes (None)."""
    if isinstance(image, dict) and set(image) <= {"bytes", "path"}:
        if image.get("bytes") is not None:
            image = bytes(image["bytes"])
        elif isinstance(image.get("path"), str):
            image = image["path"]
        else:
            raise RecordError("image_bad_type", f"{name}: the {{bytes, path}} image has neither bytes nor a path")
    if isinstance(image, str):
        path = resolve_image_path(image, image_root if image_root is not None else Path("."), allow_absolute)
        return load_image(path, max_pixels), path.read_bytes() if read_bytes else None
    if isinstance(image, os.PathLike):
        path = Path(image)
        path = path if path.is_absolute() or image_root is None else Path(image_root) / path
        return load_image(path, max_pixels), path.read_bytes() if read_bytes else None
    if isinstance(image, (bytes, bytearray, memoryview)):
        return load_image_bytes(image, name, max_pixels), bytes(image)
    if isinstance(image, Image.Image):
        with _pil_bomb_check_off():
            return _convert(image, name, max_pixels), None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise RecordError("image_bad_type", f"{name}: an array of {image.dtype} {image.shape}; expected uint8 "
                              "(H, W), (H, W, 3) RGB or (H, W, 4) RGBA (scale floats in [0, 1] by 255 first)")
        with _pil_bomb_check_off():
            return _convert(Image.fromarray(np.ascontiguousarray(image)), name, max_pixels), None
    raise RecordError("image_bad_type", f"{name}: {type(image).__name__} is not an image; give a path, bytes, a "
                      "{bytes, path} dict, a PIL.Image or a uint8 numpy array")


def _check_size(im: Image.Image, max_pixels: int, path: str) -> None:
    w, h = im.size
    if w * h > max_pixels:
        raise RecordError(
            "image_too_large",
            f"{path} is {w}×{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
            "raise --max-image-pixels to accept it",
        )
    if w < 1 or h < 1:
        raise RecordError("image_decode_error", f"{path}: image size is {w}×{h}")


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112)
        return int(value) if value is not None else 1
    except Exception:  # noqa: BLE001 - corrupt EXIF: keep the pixels as stored
        return 1


_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert an image of any PIL mode to 8-bit RGB (a new image unless already RGB without transparency).

    Rules:
    - `1`, `L`, `P`, `RGB`, `RGBX`, `CMYK`, `YCbCr`, `HSV`: PIL's conversion.
    - `LAB`: through littleCMS (LAB -> sRGB).
    - Transparency (`RGBA`, `LA`, `PA`, premultiplied `RGBa`/`La`, and `P`/`L`/`RGB`
      with a `transparency` entry, e.g. a PNG tRNS chunk) is composited on white:
      `out = round(c·a/255 + 255·(1 − a/255))`, so alpha 0 gives white and alpha 255
      the colour itself.
    - 16-bit grey `I;16`, `I;16B`, `I;16L`, `I;16N`: `v8 = round(v16 / 257)`, i.e. 65535 -> 255,
      257·k -> k (PIL's own conversion clips everything above 255 to white).
    - 32-bit integer `I`: if the maximum is above 255 the image is taken as 16-bit data
      (`round(v / 257)`, then clipped to 0..255); otherwise values are clipped to 0..255.
    - 32-bit float `F`: if every finite value lies in [0, 1] it is scaled by 255 and
      rounded; otherwise values are rounded and clipped to 0..255. NaN becomes 0.
    The grey result of the numeric modes is replicated to three channels.
    """
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _numeric_to_l(im)
        return grey.convert("RGB")
    if mode == "LAB":
        return _lab_to_rgb(im)
    if mode == "La":
        im = im.convert("LA")  # PIL cannot convert premultiplied La to RGB(A) directly
        mode = "LA"
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _numeric_to_l(im: Image.Image) -> Image.Image:
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        out = (arr.astype(np.uint32) + 128) // 257
    elif im.mode == "I":
        a = arr.astype(np.int64)
        if a.size and a.max() > 255:
            a = np.clip(a, 0, None)
            a = (a + 128) // 257
        out = np.clip(a, 0, 255)
    else:  # F
        a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=np.inf, neginf=-np.inf)
        finite = a[np.isfinite(a)]
        if finite.size == 0 or (finite.min() >= 0.0 and finite.max() <= 1.0):
            a = a * 255.0
        out = np.clip(np.rint(np.clip(a, -1.0, 256.0)), 0, 255)
    return Image.fromarray(np.ascontiguousarray(out.astype(np.uint8)))  # 2-D uint8 -> mode L


def _lab_to_rgb(im: Image.Image) -> Image.Image:
    try:
        from PIL import ImageCms
    except ImportError as e:  # pragma: no cover - Pillow built without littleCMS
        raise RecordError("image_decode_error", f"LAB image needs Pillow with littleCMS: {e}") from None
    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    return ImageCms.applyTransform(im, transform)


# -------------------------------------------------------------------- working image

#: `--resize pad` builds the square canvas only while it holds at most this many pixels,
#: or at most 4x the image's own pixels; past that (extreme aspect ratios) it is never built.
PAD_CANVAS_PIXELS = 4096 * 4096


def pad_and_resize(im: Image.Image, size: tuple[int, int], resample: str = "bicubic") -> Image.Image:
    """LLaVA's `expand2square` (centred on a square of side max(w, h), `LLAVA_PAD_COLOR`), then resize to `size` (W, H).

    Memory stays bounded for any aspect ratio (a 200000x1 strip would need a 120 GB canvas):
    - an ordinary canvas (at most `PAD_CANVAS_PIXELS` pixels, or 4x the image) is built and
      resized with PIL, as LLaVA does;
    - past that, the canvas is never built. PIL resizes in two separable passes rounded to
      8 bits in between; here the pass along the image's long side runs first, on the
      image alone (every canvas line across it is either an image line or a pad line),
      then the other pass runs over the full canvas length in strips of ~12 MB. This is
      PIL's own arithmetic, so the result equals the canvas path whenever PIL also runs
      the long-side pass first; where PIL picks the other order the two differ by the
      rounding of the intermediate (`benchmarks/pad_extreme.py` measures it; nearest is
      always identical).
    """
    iw, ih = im.size
    side = max(iw, ih)
    if side * side <= max(PAD_CANVAS_PIXELS, 4 * iw * ih):
        canvas = Image.new("RGB", (side, side), LLAVA_PAD_COLOR)
        canvas.paste(im, ((side - iw) // 2, (side - ih) // 2))
        return canvas if canvas.size == size else canvas.resize(size, RESAMPLE[resample])
    if iw > ih:
        return _pad_resize_wide(im, size, resample)
    wide = _pad_resize_wide(im.transpose(Image.Transpose.TRANSPOSE), (size[1], size[0]), resample)
    return wide.transpose(Image.Transpose.TRANSPOSE)


def _pad_resize_wide(im: Image.Image, size: tuple[int, int], resample: str) -> Image.Image:
    """`pad_and_resize` of a wider-than-tall image without the side x side canvas: horizontal pass, then vertical.

    A canvas row is an image row or a pad row: the horizontal pass of the image rows is
    `im.resize((W, ih))`, that of a pad row one resized pad row; the vertical pass then
    runs on column strips of that (W x side) intermediate, a few columns at a time.
    """
    (w, h), filt = size, RESAMPLE[resample]
    iw, ih = im.size
    top = (iw - ih) // 2
    band = np.asarray(im.resize((w, ih), filt))
    pad_row = np.asarray(Image.new("RGB", (iw, 1), LLAVA_PAD_COLOR).resize((w, 1), filt))[0]
    out = np.empty((h, w, 3), dtype=np.uint8)
    step = max(1, (1 << 22) // iw)  # columns per strip: about 12 MB of canvas at a time
    for c0 in range(0, w, step):
        c1 = min(w, c0 + step)
        strip = np.empty((iw, c1 - c0, 3), dtype=np.uint8)
        strip[:] = pad_row[c0:c1]
        strip[top:top + ih] = band[:, c0:c1]
        out[:, c0:c1] = np.asarray(Image.fromarray(strip).resize((c1 - c0, h), filt))
    return Image.fromarray(out)


def to_working(
    image: Image.Image,
    resolution: tuple[int, int],
    resize: str = "stretch",
    resample: str = "bicubic",
) -> np.ndarray:
    """The working image (spec §1.2): an (H, W, 3) uint8 C-contiguous array.

    `resolution` is (H, W). `resize`:
    - `stretch`: resize to W×H, ignoring the aspect ratio.
    - `pad`: LLaVA's `expand2square` — paste the image centred on a square canvas of
      side max(w, h) filled with `LLAVA_PAD_COLOR` = (122, 116, 104), the CLIP
      processor mean ×255 truncated as LLaVA does — then resize to W×H
      (`pad_and_resize`: without the canvas where it would be huge).
    - `crop`: centre crop to a square of side min(w, h) (offsets `(w-side)//2`,
      `(h-side)//2`), then resize to W×H.
    `resample` is one of bicubic, bilinear, lanczos, nearest, box, hamming. Nothing is
    resampled when the size already matches. A non-RGB image goes through `to_rgb`.
    """
    if resize not in RESIZE_MODES:
        raise OptionError(f"--resize {resize!r}: choose from {', '.join(RESIZE_MODES)}")
    if resample not in RESAMPLE:
        raise OptionError(f"--resample {resample!r}: choose from {', '.join(RESAMPLE_FILTERS)}")
    h, w = int(resolution[0]), int(resolution[1])
    if h < 1 or w < 1:
        raise OptionError(f"resolution {resolution!r}: each side must be at least 1")
    with _pil_bomb_check_off():  # Image.crop runs PIL's bomb check on the crop size
        im = to_rgb(image)
        iw, ih = im.size
        if resize == "pad" and iw != ih:
            im = pad_and_resize(im, (w, h), resample)
        elif resize == "crop" and iw != ih:
            side = min(iw, ih)
            left, top = (iw - side) // 2, (ih - side) // 2
            im = im.crop((left, top, left + side, top + side))
        if im.size != (w, h):
            im = im.resize((w, h), RESAMPLE[resample])
        arr = np.array(im, dtype=np.uint8)  # a copy: writable, C-contiguous
    assert arr.shape == (h, w, 3), arr.shape
    return np.ascontiguousarray(arr)


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 images in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)
