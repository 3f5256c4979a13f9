"""`--resize pad` without the square canvas: exactness, difference and memory.

    python benchmarks/pad_extreme.py            # tables on stdout

1. The canvas-free path against PIL on the real canvas, wide and tall, photo-like and
   noise images, every filter: the largest and mean difference in levels and the share
   of differing bytes.
2. The same on the strips of issue 7 at the defaults (672, bicubic).
3. Peak memory (max RSS of a fresh process above its state after imports) and time of
   `to_working(..., "pad")` on extreme strips, against the canvas path where it fits.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from cogalign.inputs.images import LLAVA_PAD_COLOR, RESAMPLE, _pad_resize_wide

FILTERS = list(RESAMPLE)


def canvas_path(im: Image.Image, size, resample: str) -> np.ndarray:
    iw, ih = im.size
    side = max(iw, ih)
    canvas = Image.new("RGB", (side, side), LLAVA_PAD_COLOR)
    canvas.paste(im, ((side - iw) // 2, (side - ih) // 2))
    return np.asarray(canvas if canvas.size == size else canvas.resize(size, RESAMPLE[resample]))


def free_path(im: Image.Image, size, resample: str) -> np.ndarray:
    """The canvas-free path, whatever the canvas size."""
    if im.width > im.height:
        return np.asarray(_pad_resize_wide(im, size, resample))
    t = _pad_resize_wide(im.transpose(Image.Transpose.TRANSPOSE), (size[1], size[0]), resample)
    return np.asarray(t.transpose(Image.Transpose.TRANSPOSE))


def random_image(rng, w, h, smooth: bool) -> Image.Image:
    if smooth:  # photo-like: a blurred field
        small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
        return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def difference(cases: int = 40) -> dict:
    """Canvas-free against canvas on random extreme-ish images: per orientation, content and filter."""
    rng = np.random.default_rng(0)
    stats: dict = {}
    for i in range(cases):
        long_side = int(rng.integers(200, 3000))
        short = int(rng.integers(1, max(2, long_side // 5)))
        out = (int(rng.integers(8, 700)),) * 2 if i % 2 else tuple(int(v) for v in rng.integers(8, 700, 2))
        smooth = i % 4 < 2
        wide = random_image(rng, long_side, short, smooth)
        for orientation, im in (("wide", wide), ("tall", wide.transpose(Image.Transpose.TRANSPOSE))):
            for f in FILTERS:
                d = np.abs(free_path(im, out, f).astype(int) - canvas_path(im, out, f).astype(int))
                key = f"{orientation}/{'photo-like' if smooth else 'noise'}/{f}"
                st = stats.setdefault(key, [0, 0, 0, 0])
                st[0], st[1], st[2], st[3] = max(st[0], int(d.max())), st[1] + int(d.sum()), st[2] + int((d > 0).sum()), \
                    st[3] + d.size
    return {k: {"max_diff": v[0], "mean_diff": round(v[1] / v[3], 5), "differing_share": round(v[2] / v[3], 5)}
            for k, v in sorted(stats.items())}


def extremes() -> dict:
    """The strips of the issue, at 672 bicubic (the defaults), against the real canvas."""
    rng = np.random.default_rng(1)
    out = {}
    for w, h in [(12000, 8), (8, 12000), (3000, 20), (20, 3000)]:
        for smooth in (True, False):
            im = random_image(rng, w, h, smooth)
            d = np.abs(free_path(im, (672, 672), "bicubic").astype(int) - canvas_path(im, (672, 672), "bicubic").astype(int))
            out[f"{w}x{h}/{'photo-like' if smooth else 'noise'}"] = {"max_diff": int(d.max()),
                                                                     "differing_share": round(float((d > 0).mean()), 5)}
    return out


CHILD = """
import sys, time, numpy as np
from PIL import Image
from cogalign.inputs.images import to_working, LLAVA_PAD_COLOR, RESAMPLE
w, h, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def peak_kb():  # VmHWM; ru_maxrss would carry the parent's size over fork + exec
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current size
base = peak_kb()
im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
t = time.perf_counter()
if mode == "canvas":
    side = max(w, h); c = Image.new("RGB", (side, side), LLAVA_PAD_COLOR); c.paste(im, ((side - w) // 2, (side - h) // 2))
    out = np.asarray(c.resize((672, 672), RESAMPLE["bicubic"]))
else:
    out = to_working(im, (672, 672), "pad", "bicubic")
print((peak_kb() - base) / 1024, time.perf_counter() - t)
"""


def memory() -> list[dict]:
    rows = []
    for w, h in [(12000, 8), (8, 12000), (200000, 1), (1, 200000), (4000, 3000)]:
        for mode in ("cogalign", "canvas"):
            if mode == "canvas" and max(w, h) ** 2 > 200_000_000:
                continue
            out = subprocess.run([sys.executable, "-c", CHILD, str(w), str(h), mode], capture_output=True, text=True)
            if out.returncode:
                rows.append({"image": f"{w}x{h}", "path": mode, "error": out.stderr.strip().splitlines()[-1]})
                continue
            mb, seconds = map(float, out.stdout.split())
            rows.append({"image": f"{w}x{h}", "path": mode, "extra_peak_MB": round(mb, 1), "seconds": round(seconds, 3)})
    return rows


if __name__ == "__main__":
    started = time.perf_counter()
    memory_rows = memory()  # first, while this process is small
    print(json.dumps({"difference": difference(), "extremes_672_bicubic": extremes(), "memory_672_bicubic": memory_rows,
                      "seconds": round(time.perf_counter() - started, 1)}, indent=1))
