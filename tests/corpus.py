"""A corpus of bad (and good) inputs with the exact outcome expected for every record.

    json_path, expected = make_bad_corpus(tmp_path)            # JSON array
    json_path, expected = make_bad_corpus(tmp_path, fmt="jsonl")  # JSONL, adds invalid lines

Layout written under `root`:

    root/corpus.json | corpus.jsonl   the records (one per case)
    root/images/                      the image root: pass `image_root(root)` (= root / "images")
    root/outside/                     files outside the image root (targets of escapes)

`expected[i]` is the outcome of the record at position i (as `iter_records` counts
positions) under default options (`--max-image-pixels` default, absolute paths not
allowed): `Expected(index, id, outcome, reason, case)` with outcome "expand"
(reason None), "pass" (reason "text_only" | "video") or "reject" (reason the stable
code from `cogalign.inputs.records` / `cogalign.inputs.images`). `id` is the record's `id` when it
is a string, else "". `case` is a short name for the case, for messages.
"""
from __future__ import annotations

import functools
import io
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_DIR = "images"
OUTSIDE_DIR = "outside"
BOMB_SIZE = (20000, 20000)  # 400M pixels: over PIL's default limit and over 2x it


@dataclass(frozen=True)
class Expected:
    index: int
    id: str
    outcome: str  # "expand" | "pass" | "reject"
    reason: str | None  # None for expand; "text_only"/"video" for pass; the reject code
    case: str = ""


def image_root(root: Path) -> Path:
    return Path(root) / IMAGE_DIR


# ------------------------------------------------------------------ image makers

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=8)
def constant_png_bytes(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, built without holding the pixels
    (20000×20000 compresses to ~50 KB in ~0.2 s)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    parts = []
    full, rest = divmod(height, 256)
    block = row * 256
    for _ in range(full):
        parts.append(comp.compress(block))
    parts.append(comp.compress(row * rest))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b"")


def noise_rgb(w: int = 24, h: int = 16, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _save(im: Image.Image, path: Path, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    path.write_bytes(buf.getvalue())


def mode_images() -> dict[str, tuple[Image.Image, str, dict]]:
    """name -> (image, PIL format, save kwargs): one image for every mode §1 must handle."""
    w, h = 24, 16
    rgb = noise_rgb(w, h)
    grey = rgb.convert("L")
    rgba = rgb.copy()
    alpha = Image.linear_gradient("L").resize((w, h))
    rgba.putalpha(alpha)
    la = grey.copy()
    la.putalpha(alpha)
    p = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    i16 = Image.fromarray((np.arange(w * h, dtype=np.uint16).reshape(h, w) * 170))
    i32 = Image.fromarray((np.arange(w * h, dtype=np.int32).reshape(h, w) * 170))
    f32 = Image.fromarray(np.linspace(0.0, 1.0, w * h, dtype=np.float32).reshape(h, w))
    return {
        "mode_1.png": (grey.convert("1"), "PNG", {}),
        "mode_L.png": (grey, "PNG", {}),
        "mode_LA.png": (la, "PNG", {}),
        "mode_P.png": (p, "PNG", {}),
        "mode_P_trns.png": (p, "PNG", {"transparency": 0}),
        "mode_P_trns.gif": (p, "GIF", {"transparency": 3}),
        "mode_RGB.png": (rgb, "PNG", {}),
        "mode_RGB.jpg": (rgb, "JPEG", {"quality": 90}),
        "mode_RGB.webp": (rgb, "WEBP", {"lossless": True}),
        "mode_RGB.bmp": (rgb, "BMP", {}),
        "mode_RGBA.png": (rgba, "PNG", {}),
        "mode_RGBA.webp": (rgba, "WEBP", {"lossless": True}),
        "mode_CMYK.jpg": (rgb.convert("CMYK"), "JPEG", {"quality": 90}),
        "mode_CMYK.tif": (rgb.convert("CMYK"), "TIFF", {}),
        "mode_YCbCr.tif": (rgb.convert("YCbCr"), "TIFF", {}),
        "mode_I16.png": (i16, "PNG", {}),
        "mode_I16B.tif": (Image.frombytes("I;16B", (w, h), np.asarray(i16).astype(">u2").tobytes()), "TIFF", {}),
        "mode_I.tif": (i32, "TIFF", {}),
        "mode_F.tif": (f32, "TIFF", {}),
        "mode_LAB.tif": (Image.merge("LAB", [grey, Image.new("L", (w, h), 128), Image.new("L", (w, h), 128)]), "TIFF", {}),
    }


def _exif_rotated_jpeg(path: Path) -> None:
    im = noise_rgb(24, 16, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(im, path, "JPEG", exif=exif.tobytes(), quality=90)


def _animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    noise_rgb(64, 64, seed=2).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_png(path: Path) -> None:
    buf = io.BytesIO()
    noise_rgb(64, 64, seed=3).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 10
    for k in range(start, start + 50):
        data[k] ^= 0x55
    path.write_bytes(bytes(data))


def write_images(root: Path) -> None:
    """Write every image file the corpus refers to (idempotent)."""
    images = image_root(root)
    outside = Path(root) / OUTSIDE_DIR
    images.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    for name, (im, fmt, kw) in mode_images().items():
        _save(im, images / name, fmt, **kw)
    _exif_rotated_jpeg(images / "exif_orientation_6.jpg")
    _animated_gif(images / "animated.gif")
    _animated_gif(images / "gif_named.jpg")
    _save(noise_rgb(), images / "png_named.jpg", "PNG")
    _save(noise_rgb(1, 1), images / "tiny_1x1.png", "PNG")
    _save(noise_rgb(64, 4), images / "wide_64x4.png", "PNG")
    _save(noise_rgb(4, 64), images / "tall_4x64.png", "PNG")
    _save(noise_rgb(), images / "sub" / "nested.png", "PNG")
    _save(noise_rgb(), images / "name with spaces é.png", "PNG")
    (images / "empty.jpg").write_bytes(b"")
    _truncated_jpeg(images / "truncated.jpg")
    _corrupt_png(images / "corrupt.png")
    (images / "text.jpg").write_text("this is not an image\n")
    (images / "bomb.png").write_bytes(constant_png_bytes(*BOMB_SIZE))
    _save(noise_rgb(), outside / "secret.png", "PNG")
    for link, target in (
        ("link_inside.png", "mode_RGB.png"),
        ("link_escape.png", os.path.join("..", OUTSIDE_DIR, "secret.png")),
        ("link_dir_escape", os.path.join("..", OUTSIDE_DIR)),
        ("link_broken.png", "no_such_target.png"),
    ):
        p = images / link
        if p.is_symlink() or p.exists():
            p.unlink()
        p.symlink_to(target)


# ---------------------------------------------------------------------- records

def _conv(n_pairs: int = 1, first: str = "<image>\nWhat is shown here?") -> list[dict]:
    turns = []
    for k in range(n_pairs):
        turns.append({"from": "human", "value": first if k == 0 else f"Question {k}?"})
        turns.append({"from": "gpt", "value": f"Answer {k}."})
    return turns


def _cases(root: Path) -> list[tuple[str, object, str, str | None]]:
    """(case, record, outcome, reason) in file order."""
    outside_secret = str((Path(root) / OUTSIDE_DIR / "secret.png").resolve())
    cases: list[tuple[str, object, str, str | None]] = []

    def rec(case: str, record: object, outcome: str, reason: str | None = None) -> None:
        cases.append((case, record, outcome, reason))

    def img(case: str, image: object, outcome: str = "expand", reason: str | None = None, **extra) -> None:
        rec(case, {"id": case, "image": image, "conversations": _conv(), **extra}, outcome, reason)

    # --- images that decode: every mode, formats, orientation, animation, sniffing
    for name in mode_images():
        img(f"img:{name}", name)
    for name in ("exif_orientation_6.jpg", "animated.gif", "gif_named.jpg", "png_named.jpg", "tiny_1x1.png",
                 "wide_64x4.png", "tall_4x64.png", "sub/nested.png", "name with spaces é.png"):
        img(f"img:{name}", name)
    img("path:dot-slash", "./mode_RGB.png")
    img("path:inner-dotdot", "sub/../mode_RGB.png")
    img("path:double-slash", "sub//nested.png")
    img("path:symlink-inside", "link_inside.png")
    img("image-list:first-ok", ["mode_RGB.png", "missing.png"], conversations=_conv(first="<image>\n<image>\nQ?"))
    img("image-list:single", ["mode_L.png"])
    img("image-and-video", "mode_RGB.png", video="clip.mp4")

    # --- images that are rejected
    img("img:empty-file", "empty.jpg", "reject", "image_empty_file")
    img("img:truncated-jpeg", "truncated.jpg", "reject", "image_decode_error")
    img("img:corrupt-png", "corrupt.png", "reject", "image_decode_error")
    img("img:text-named-jpg", "text.jpg", "reject", "image_unidentified")
    img("img:bomb", "bomb.png", "reject", "image_too_large")
    img("path:missing", "missing.jpg", "reject", "image_missing")
    img("path:missing-dir", "no_dir/x.jpg", "reject", "image_missing")
    img("path:directory", "sub", "reject", "image_missing")
    img("path:broken-symlink", "link_broken.png", "reject", "image_missing")
    img("path:backslash-relative", "sub\\nested.png", "reject", "image_missing")  # a file name on POSIX
    img("path:nul-byte", "mode_RGB.png\x00.jpg", "reject", "image_missing")
    img("path:empty", "", "reject", "image_path_empty")
    img("path:dotdot", f"../{OUTSIDE_DIR}/secret.png", "reject", "image_path_escapes_root")
    img("path:dotdot-deep", f"sub/../../{OUTSIDE_DIR}/secret.png", "reject", "image_path_escapes_root")
    img("path:dotdot-missing", "../nothing_here.png", "reject", "image_path_escapes_root")
    img("path:symlink-escape", "link_escape.png", "reject", "image_path_escapes_root")
    img("path:symlink-dir-escape", "link_dir_escape/secret.png", "reject", "image_path_escapes_root")
    img("path:absolute-existing", outside_secret, "reject", "image_path_absolute")
    img("path:absolute-missing", "/nonexistent/dir/x.jpg", "reject", "image_path_absolute")
    img("path:windows-drive", "C:\\images\\x.jpg", "reject", "image_path_absolute")
    img("path:windows-drive-slash", "D:/images/x.jpg", "reject", "image_path_absolute")
    img("path:unc", "\\\\server\\share\\x.jpg", "reject", "image_path_absolute")
    img("image-list:first-missing", ["missing.png", "mode_RGB.png"], "reject", "image_missing",
        conversations=_conv(first="<image>\n<image>\nQ?"))
    img("image-list:first-escapes", [f"../{OUTSIDE_DIR}/secret.png", "mode_RGB.png"], "reject", "image_path_escapes_root",
        conversations=_conv(first="<image>\n<image>\nQ?"))

    # --- image value types
    img("image-type:int", 5, "reject", "image_bad_type")
    img("image-type:bool", True, "reject", "image_bad_type")
    img("image-type:object", {"path": "mode_RGB.png"}, "reject", "image_bad_type")
    img("image-type:empty-list", [], "reject", "image_bad_type")
    img("image-type:list-null", [None], "reject", "image_bad_type")
    img("image-type:list-mixed", ["mode_RGB.png", 3], "reject", "image_bad_type")

    # --- passes
    rec("pass:no-image-key", {"id": "pass:no-image-key", "conversations": _conv(first="Tell me a joke.")}, "pass", "text_only")
    rec("pass:image-null", {"id": "pass:image-null", "image": None, "conversations": _conv(first="Hi")}, "pass", "text_only")
    rec("pass:video", {"id": "pass:video", "video": "clip.mp4", "conversations": _conv(first="<video>\nWhat happens?")}, "pass", "video")
    rec("pass:video-image-null", {"id": "pass:video-image-null", "video": "clip.mp4", "image": None, "conversations": _conv()}, "pass", "video")
    rec("tokens:image-null", {"id": "tokens:image-null", "image": None, "conversations": _conv()},
        "reject", "image_token_without_image")
    img("tokens:two-for-one", "mode_RGB.png", "reject", "image_count_mismatch", conversations=_conv(first="<image><image>"))
    img("image:remote-url", "https://example.com/a.png", "reject", "image_remote_url")
    img("index:negative", "mode_RGB.png", "reject", "cogalign_index_bad", cogalign_index=-1)
    img("index:given", "mode_RGB.png", cogalign_index=7)
    rec("pass:video-null", {"id": "pass:video-null", "video": None, "conversations": _conv(first="Hi")}, "pass", "text_only")

    # --- ids and extra keys (never a reject)
    rec("id:int", {"id": 12345, "image": "mode_RGB.png", "conversations": _conv()}, "expand")
    rec("id:missing", {"image": "mode_RGB.png", "conversations": _conv()}, "expand")
    rec("id:null", {"id": None, "image": "mode_RGB.png", "conversations": _conv()}, "expand")
    rec("id:object", {"id": {"a": [1, 2]}, "image": "mode_RGB.png", "conversations": _conv()}, "expand")
    rec("id:duplicate", {"id": "id:int-dup", "image": "mode_L.png", "conversations": _conv()}, "expand")
    rec("id:duplicate", {"id": "id:int-dup", "image": "mode_L.png", "conversations": _conv()}, "expand")
    rec("extra-keys", {"id": "extra-keys", "image": "mode_RGB.png", "conversations": _conv(3),
                       "data_source": "coco", "meta": {"nested": [1, 2.5, {"x": None}], "ünïcödé": "✓ 日本語 😀"},
                       "score": 0.25, "flags": [True, False]}, "expand")
    rec("unicode-values", {"id": "unicode-values", "image": "mode_RGB.png",
                           "conversations": [{"from": "human", "value": "<image>\nQu'est-ce que c'est ? 这是什么？ 😀"},
                                             {"from": "gpt", "value": "Ein Bild — \u2028 mit \"Anführungszeichen\" und \\ Backslash."}]},
        "expand")
    rec("turn-extra-keys", {"id": "turn-extra-keys", "image": "mode_RGB.png",
                            "conversations": [{"from": "human", "value": "<image>\nHi", "weight": 0},
                                              {"from": "gpt", "value": "Hello", "weight": 1}]}, "expand")
    rec("no-image-token", {"id": "no-image-token", "image": "mode_RGB.png", "conversations": _conv(first="No token here")}, "expand")

    # --- record shapes
    for case, value in (("not-object:list", [1, 2]), ("not-object:string", "record"), ("not-object:number", 7),
                        ("not-object:null", None), ("not-object:bool", False)):
        rec(case, value, "reject", "not_an_object")
    rec("conv:missing", {"id": "conv:missing", "image": "mode_RGB.png"}, "reject", "conversations_missing")
    # chat-format records are converted to LLaVA turns (cogalign.inputs.turns, tested in test_inputs.py);
    # these cannot be, and are rejected as the record check says
    rec("conv:messages", {"id": "conv:messages", "messages": "hi"}, "reject", "conversations_missing")
    for case, value in (("conv:string", "hello"), ("conv:object", {"from": "human", "value": "x"}), ("conv:null", None), ("conv:number", 3)):
        rec(case, {"id": case, "image": "mode_RGB.png", "conversations": value}, "reject", "conversations_not_list")
    rec("conv:empty", {"id": "conv:empty", "image": "mode_RGB.png", "conversations": []}, "reject", "conversations_empty")

    def conv_case(case: str, conv: list, reason: str, image: object = "mode_RGB.png") -> None:
        rec(case, {"id": case, "image": image, "conversations": conv}, "reject", reason)

    h = {"from": "human", "value": "<image>\nQ?"}
    g = {"from": "gpt", "value": "A."}
    conv_case("turn:string", ["hi", g], "turn_not_object")
    conv_case("turn:null", [h, None], "turn_not_object")
    conv_case("turn:list", [h, ["gpt", "A."]], "turn_not_object")
    conv_case("role:user", [{"from": "user", "value": "Q"}, g], "turn_bad_role")
    conv_case("role:Human", [{"from": "Human", "value": "Q"}, g], "turn_bad_role")
    conv_case("role:assistant", [h, {"from": "assistant", "value": "A"}], "turn_bad_role")
    conv_case("role:missing", [h, {"value": "A"}], "turn_bad_role")
    conv_case("role:null", [h, {"from": None, "value": "A"}], "turn_bad_role")
    conv_case("role:number", [h, {"from": 1, "value": "A"}], "turn_bad_role")
    conv_case("role:role-content", [{"role": "narrator", "content": "<image>\nQ"}, {"role": "assistant", "content": "A"}], "turn_bad_role")
    conv_case("role:system-later", [h, g, {"from": "system", "value": "S"}, g], "turn_bad_role")
    conv_case("value:null", [h, {"from": "gpt", "value": None}], "turn_value_not_string")
    conv_case("value:missing", [h, {"from": "gpt"}], "turn_value_not_string")
    conv_case("value:list", [{"from": "human", "value": ["<image>", "Q"]}, g], "turn_value_not_string")
    conv_case("value:number", [h, {"from": "gpt", "value": 42}], "turn_value_not_string")
    conv_case("system:leading", [{"from": "system", "value": "You are helpful."}, h, g], "leading_system_turn")
    conv_case("alt:starts-gpt", [g, h], "roles_not_alternating")
    conv_case("alt:human-human", [h, h, g, g], "roles_not_alternating")
    conv_case("alt:gpt-gpt", [h, g, g, h], "roles_not_alternating")
    conv_case("odd:one-turn", [h], "odd_turn_count")
    conv_case("odd:three-turns", [h, g, h], "odd_turn_count")
    # order of checks: the earlier check wins
    conv_case("order:bad-role-before-alternation", [g, {"from": "user", "value": "x"}], "turn_bad_role")
    conv_case("order:value-before-alternation", [g, {"from": "human", "value": 1}], "turn_value_not_string")
    conv_case("order:alternation-before-odd", [h, h, g], "roles_not_alternating")
    conv_case("order:conv-before-image-type", [h], "odd_turn_count", image=5)
    conv_case("order:conv-before-image-missing", [g, h], "roles_not_alternating", image="missing.jpg")
    rec("order:conv-before-text-only", {"id": "order:conv-before-text-only", "conversations": [g]}, "reject", "roles_not_alternating")
    return cases


def make_bad_corpus(root: Path, fmt: str = "json") -> tuple[Path, list[Expected]]:
    """Write the corpus under `root`; return (records file, expected outcome per position).

    `fmt="jsonl"` writes one record per line and adds blank lines (no position) and
    lines that are not valid JSON (reject `invalid_json`)."""
    if fmt not in ("json", "jsonl"):
        raise ValueError(f"fmt must be 'json' or 'jsonl', not {fmt!r}")
    root = Path(root)
    write_images(root)
    cases = _cases(root)
    expected: list[Expected] = []

    def add(case: str, record: object, outcome: str, reason: str | None) -> None:
        rid = record.get("id") if isinstance(record, dict) else None
        expected.append(Expected(len(expected), rid if isinstance(rid, str) else "", outcome, reason, case))

    if fmt == "json":
        for case in cases:
            add(*case)
        path = root / "corpus.json"
        path.write_text(json.dumps([c[1] for c in cases], ensure_ascii=False, indent=1), encoding="utf-8")
        return path, expected

    lines: list[str] = []
    bad_lines = {
        3: '{"id": "jsonl:truncated", "image": "mode_RGB.png", "conversations": [',
        10: "not json at all",
        20: '{"id": "jsonl:trailing-comma",}',
    }
    for k, case in enumerate(cases):
        if k in bad_lines:
            lines.append(bad_lines[k])
            expected.append(Expected(len(expected), "", "reject", "invalid_json", f"jsonl:bad-line-{k}"))
        if k % 7 == 0:
            lines.append("")  # blank lines take no position
            lines.append("   \t")
        lines.append(json.dumps(case[1], ensure_ascii=False))
        add(*case)
    path = root / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, expected
