"""Synthetic data for the training tests: images of four solid-colour quadrants from a small palette."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (230, 220, 40)]


def quadrant_set(folder: Path, n: int, seed: int, prefix: str = "q") -> Path:
    """`n` 32×32 images, each quadrant one palette colour; a LLaVA JSON with one short turn pair each."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        colours = rng.integers(0, len(PALETTE), 4)
        arr = np.zeros((32, 32, 3), np.uint8)
        for q, (y, x) in enumerate([(0, 0), (0, 16), (16, 0), (16, 16)]):
            arr[y:y + 16, x:x + 16] = PALETTE[colours[q]]
        name = f"images/{prefix}{i:04d}.png"
        Image.fromarray(arr).save(folder / name)
        records.append({"id": f"{prefix}{i:04d}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "Four squares."}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def expand_px(src: Path, out: Path, regions: str = "quarters") -> None:
    """Expand with one RGB turn per record whose answer is one pixel (--px-resolution 2)."""
    from tests.helpers import run_cli

    templates = src.parent / "templates.json"  # one short prompt keeps the sequences (and the test) short
    templates.write_text(json.dumps({"vq": ["VQ of this image?"], "px": ["RGB of this image?"]}))
    run_cli("expand", src, "--out", out, "--targets", "px", "--px-resolution", "2", "--vq-resolution", "64",
            "--templates", templates, "--regions", regions,
            "--resample", "box", "--workers", "0", "--no-progress")


def shuffle_answers(out: Path, seed: int = 0) -> None:
    """Permute the RGB answers across records in place: the answers no longer match the images."""
    from cogalign.train.data import shard_files
    from cogalign.expand.writer import read_shard, rows_to_table, to_row
    import pyarrow.parquet as pq

    (path,) = shard_files(out)
    recs = list(read_shard(path))
    spots = [(r, i) for r, rec in enumerate(recs) for i, t in enumerate(rec["conversations"])
             if t["from"] == "gpt" and t["value"].startswith("<rgb start>")]
    values = [recs[r]["conversations"][i]["value"] for r, i in spots]
    perm = np.random.default_rng(seed).permutation(len(values))
    for (r, i), j in zip(spots, perm):
        recs[r]["conversations"][i]["value"] = values[j]
    pq.write_table(rows_to_table([to_row(r) for r in recs]), path)
