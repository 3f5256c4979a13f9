"""TargetPX and TargetVQ text (spec §3, §4), vectorised, and parsers for both.

`px_list_text` is byte-identical to `str(pixels.reshape(-1, 3).tolist())`. For uint8
pixels it writes every pixel into a fixed 17-byte slot, `[rrr, ggg, bbb], `, whose
digits come from lookup tables padded with NUL bytes, then deletes the NULs with
`bytes.translate`: about 10x faster than `str(tolist())` on uniformly random pixels
and 15-20x on photographs (336x336 region).
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import orjson

__all__ = [
    "RGB_START", "RGB_END", "VQ_START", "VQ_END", "px_list_text", "px_text", "vq_list_text", "vq_text",
    "parse_px", "parse_vq",
]

RGB_START, RGB_END = "<rgb start>", "<rgb end>"
VQ_START, VQ_END = "<vq start>", "<vq end>"

_SLOT = 17
_PX_CHARS = re.compile(r"[0-9\[\], \t\r\n]*")
_VQ_CHARS = re.compile(r"[0-9, \t\r\n]*")


def _digits(value: int) -> bytes:
    return str(value).encode().ljust(3, b"\0")


@lru_cache(maxsize=1)
def _tables() -> tuple[np.ndarray, np.ndarray]:
    """(red, green) -> b"rrr, ggg" indexed by r + 256 g; blue -> b", bbb], " (NUL-padded digits)."""
    digits = np.frombuffer(b"".join(_digits(v) for v in range(256)), np.uint8).reshape(256, 3)
    red_green = np.empty((256, 256, 8), np.uint8)
    red_green[:, :, 0:3] = digits[None, :, :]
    red_green[:, :, 3:5] = np.frombuffer(b", ", np.uint8)
    red_green[:, :, 5:8] = digits[:, None, :]
    blue = np.frombuffer(b"".join(b", " + _digits(v) + b"], " for v in range(256)), np.uint64)
    return red_green.view(np.uint64).reshape(65536), blue


def _as_pixels(pixels: np.ndarray) -> np.ndarray:
    arr = np.asarray(pixels)
    if arr.ndim < 1 or arr.shape[-1] != 3:
        raise ValueError(f"pixels must have shape (..., 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        # RGB text holds 0..255 per channel; parse_px reads nothing else back
        if arr.dtype.kind == "f" and arr.size and 0 <= arr.min() and arr.max() <= 1:
            fix = "floats in 0..1: scale them by 255; convert with (x * 255).round().astype(np.uint8)"
        elif arr.dtype.kind in "iuf" and arr.size and 0 <= arr.min() and arr.max() <= 255:
            fix = "values are in 0..255: convert with " + (
                "x.astype(np.uint8)" if arr.dtype.kind in "iu" else "x.round().astype(np.uint8)")
        elif arr.dtype.kind in "iuf" and arr.size:
            fix = f"values reach {arr.min()}..{arr.max()}: rescale them to 0..255, then x.astype(np.uint8)"
        else:
            fix = "convert with x.astype(np.uint8)"
        raise ValueError(f"pixels must be uint8 (RGB text holds 0..255 per channel), got {arr.dtype}; {fix}")
    return arr.reshape(-1, 3)


def _generic_list_text(values: np.ndarray) -> str:
    data = orjson.dumps(np.ascontiguousarray(values, dtype=np.int64), option=orjson.OPT_SERIALIZE_NUMPY)
    return data.replace(b",", b", ").decode("ascii")


def px_list_text(pixels: np.ndarray) -> str:
    """(h, w, 3) or (N, 3) uint8 pixels -> `[[r, g, b], ...]`, exactly `str(tolist())`.
    Any other dtype raises ValueError (one line with the conversion): `parse_px` reads back
    only 0..255, so no value outside it is ever written."""
    px = _as_pixels(pixels)
    n = px.shape[0]
    if n == 0:
        return "[]"
    px = np.ascontiguousarray(px)
    red_green, blue = _tables()
    red_green_index = np.ndarray((n,), dtype="<u2", buffer=px, strides=(3,))
    buf = bytearray(_SLOT * n + 1)

    def column(offset: int, dtype) -> np.ndarray:
        return np.ndarray((n,), dtype=dtype, buffer=buf, offset=1 + offset, strides=(_SLOT,))

    column(0, np.uint8)[:] = ord("[")
    np.take(red_green, red_green_index, out=column(1, np.uint64), mode="clip")
    np.take(blue, px[:, 2], out=column(9, np.uint64), mode="clip")
    buf[0] = ord("[")
    buf[-2:] = b"]\0"
    return buf.translate(None, b"\0").decode("ascii")


def px_text(pixels: np.ndarray) -> str:
    """TargetPX: `<rgb start>[[r, g, b], ...]<rgb end>` from uint8 pixels (see `px_list_text`)."""
    return RGB_START + px_list_text(pixels) + RGB_END


def vq_list_text(indices: np.ndarray) -> str:
    """Row-major indices -> `3492, 3492, 532` (comma + space, no brackets)."""
    arr = np.asarray(indices)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"VQ indices must be an integer array, got dtype {arr.dtype}")
    return _generic_list_text(arr.reshape(-1))[1:-1]


def vq_text(indices: np.ndarray) -> str:
    """TargetVQ: `<vq start>3492, 3492, 532<vq end>`."""
    return VQ_START + vq_list_text(indices) + VQ_END


def _inner(text: str, start: str, end: str, what: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{what} text must be a str, got {type(text).__name__}")
    if not (text.startswith(start) and text.endswith(end)) or len(text) < len(start) + len(end):
        raise ValueError(f"malformed {what} text: it must start with {start!r} and end with {end!r}; "
                         f"got {_snippet(text)}")
    return text[len(start):len(text) - len(end)]


def _snippet(text: str, size: int = 40) -> str:
    return repr(text if len(text) <= 2 * size else text[:size] + " ... " + text[-size:])


def _load(body: str, allowed: re.Pattern, what: str, expected: str, wrap: bool = False) -> list:
    if not allowed.fullmatch(body):
        bad = next(ch for ch in body if not allowed.fullmatch(ch))
        raise ValueError(f"malformed {what} text: unexpected character {bad!r}; expected {expected}")
    try:
        return orjson.loads(f"[{body}]" if wrap else body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"malformed {what} text: {exc}; expected {expected}; got {_snippet(body)}") from None


def _int_array(values: list, what: str, expected: str) -> np.ndarray:
    try:
        return np.array(values, dtype=np.int64)
    except (ValueError, OverflowError, TypeError):
        raise ValueError(f"malformed {what} text: expected {expected}") from None


def parse_px(text: str) -> np.ndarray:
    """Inverse of `px_text`: -> (N, 3) uint8."""
    expected = "[[r, g, b], ...] with integers 0-255"
    values = _load(_inner(text, RGB_START, RGB_END, "RGB"), _PX_CHARS, "RGB", expected)
    if not isinstance(values, list) or any(not isinstance(v, list) or len(v) != 3 for v in values):
        raise ValueError(f"malformed RGB text: expected {expected}")
    arr = _int_array(values, "RGB", expected).reshape(-1, 3)
    if arr.size and arr.max() > 255:
        raise ValueError(f"malformed RGB text: value {int(arr.max())} is above 255")
    return arr.astype(np.uint8)


def parse_vq(text: str) -> np.ndarray:
    """Inverse of `vq_text`: -> (N,) int64."""
    expected = "comma-separated non-negative integers, e.g. '3492, 532'"
    body = _inner(text, VQ_START, VQ_END, "VQ")
    values = _load(body, _VQ_CHARS, "VQ", expected, wrap=True) if body.strip() else []
    return _int_array(values, "VQ", expected).reshape(-1)
