"""What a record's targets mean, as pictures: the region as the model saw it, the image decoded
from the VQ indices in the text, and the RGB dump parsed back, each with its PSNR against the
region; and one PNG that puts them side by side with captions."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cogalign.errors import CogalignError
from cogalign.inputs.images import psnr_db
from cogalign.inspect.records import Target, targets, working_image
from cogalign.targets.render import parse_px, parse_vq

__all__ = ["Panel", "RecordView", "view_record", "compose", "display", "panel_origin", "psnr_db", "fmt_psnr",
           "PANEL", "CAPTION_LINES", "PAD", "LINE_H"]

PANEL = 224          # display size of the longer side of each panel
CAPTION_LINES = 3


@dataclass
class Panel:
    """One image of the `show` figure: title, pixels at the target's own resolution, caption, PSNR."""
    title: str
    pixels: np.ndarray           # (h, w, 3) uint8 at the target's own resolution
    caption: str = ""
    psnr_db: float | None = None


@dataclass
class RecordView:
    """The panels of one record: for each target turn, the region and what its text decodes to."""

    record_id: object
    image: str
    panels: list[Panel] = field(default_factory=list)
    turns: list[dict] = field(default_factory=list)




def fmt_psnr(value: float | None) -> str:
    """A PSNR for a caption: `12.34 dB`, `exact (inf dB)`, or `n/a`."""
    if value is None:
        return "n/a"
    return "exact (inf dB)" if math.isinf(value) else f"{value:.2f} dB"


def _region(record: dict, manifest: dict, meta: dict, image_root, cache: dict) -> np.ndarray:
    res = tuple(meta["resolution"])
    if res not in cache:
        cache[res] = working_image(record, manifest, res, image_root)
    x0, y0, x1, y1 = meta["box"]
    return np.ascontiguousarray(cache[res][y0:y1, x0:x1])


def view_record(record: dict, manifest: dict, decoder=None, image_root: Path | None = None) -> RecordView:
    """Panels for every target turn of an expanded record. `decoder` (a VQDecoder) is needed
    for VQ turns; without it the VQ panel is left out and its caption says why. Errors name the record."""
    try:
        return _view_record(record, manifest, decoder, image_root)
    except CogalignError as e:
        if str(e).startswith("record "):
            raise
        raise CogalignError(f"record {record.get('id')!r}: {e}") from None


def _view_record(record: dict, manifest: dict, decoder, image_root: Path | None) -> RecordView:
    view = RecordView(record.get("id"), record.get("image"))
    cache: dict = {}
    turns = sorted(targets(record), key=lambda t: t.kind != "vq")  # VQ turns first; refuses unexpanded records
    prov = record["cogalign"]
    for t in turns:
        view.turns.append({**t.meta, "question": t.question})
        region = _region(record, manifest, t.meta, image_root, cache)
        h, w = region.shape[:2]
        # in the record's own terms: the box (x0, y0, x1, y1) and the [3, H, W] its text states
        where = (f"{t.meta['region']} ({', '.join(map(str, t.meta['box']))}): h {h} x w {w} of "
                 f"[3, {t.meta['resolution'][0]}, {t.meta['resolution'][1]}]")
        view.panels.append(Panel(f"region ({t.kind.upper()} input)", region, where))
        if t.kind == "px":
            view.panels.append(_px_panel(t, region))
        else:
            view.panels.append(_vq_panel(t, region, decoder, prov))
    return view


def _px_panel(t: Target, region: np.ndarray) -> Panel:
    h, w = region.shape[:2]
    try:
        px = parse_px(t.answer)
    except ValueError as exc:
        raise CogalignError(f"the RGB answer does not parse ({exc})") from None
    if px.shape[0] != h * w:
        raise CogalignError(f"the RGB answer has {px.shape[0]} pixels, the h {h} x w {w} region needs {h * w}")
    drawn = px.reshape(h, w, 3)
    p = psnr_db(drawn, region)
    return Panel("RGB text, drawn", drawn, f"{h * w} pixels; PSNR vs region {fmt_psnr(p)}", p)


def _vq_panel(t: Target, region: np.ndarray, decoder, prov: dict) -> Panel:
    h, w = region.shape[:2]
    try:
        idx = parse_vq(t.answer)
    except ValueError as exc:
        raise CogalignError(f"the VQ answer does not parse ({exc})") from None
    if decoder is None:
        return Panel("VQ text, decoded", np.zeros_like(region), f"{idx.size} indices; no decoder (pass --vq)")
    f = decoder.downsample
    if idx.size != (h // f) * (w // f):
        raise CogalignError(f"the VQ answer has {idx.size} indices; the h {h} x w {w} region at f={f} needs "
                            f"{(h // f) * (w // f)}: is --vq the tokenizer of this run ({prov.get('tokenizer')})?")
    decoded = decoder.decode(idx.reshape(h // f, w // f))
    p = psnr_db(decoded, region)
    return Panel("VQ text, decoded", decoded, f"{idx.size} indices, f={f}; PSNR vs region {fmt_psnr(p)}", p)


# ---------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------

def display(pixels: np.ndarray, size: int = PANEL) -> Image.Image:
    """Scale a panel so its longer side is `size` (nearest: pixels stay visible as blocks)."""
    h, w = pixels.shape[:2]
    s = size / max(h, w)
    return Image.fromarray(pixels).resize((max(1, round(w * s)), max(1, round(h * s))), Image.NEAREST)


def _font():
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return (lines + [line])[:CAPTION_LINES]


PAD, LINE_H = 8, 16


def panel_origin(i: int, title: bool) -> tuple[int, int]:
    """Top-left corner of panel i's PANEL x PANEL cell in `compose`'s image."""
    return PAD + i * (PANEL + PAD), (LINE_H + PAD if title else 0) + PAD


def compose(view: RecordView, title: str = "") -> Image.Image:
    """All panels side by side, each centred in a PANEL x PANEL cell, title and caption underneath."""
    font = _font()
    caption_h = LINE_H * (CAPTION_LINES + 1)
    n = len(view.panels)
    _, top = panel_origin(0, bool(title))
    canvas = Image.new("RGB", (PAD + n * (PANEL + PAD), top + PANEL + caption_h + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PAD, PAD // 2), title, fill="black", font=font)
    line_h = LINE_H
    for i, panel in enumerate(view.panels):
        x, y0 = panel_origin(i, bool(title))
        im = display(panel.pixels)
        canvas.paste(im, (x + (PANEL - im.width) // 2, y0 + (PANEL - im.height) // 2))
        y = y0 + PANEL + 4
        draw.text((x, y), panel.title, fill="black", font=font)
        for j, line in enumerate(_wrap(draw, panel.caption, font, PANEL)):
            draw.text((x, y + line_h * (j + 1)), line, fill=(60, 60, 60), font=font)
    return canvas
