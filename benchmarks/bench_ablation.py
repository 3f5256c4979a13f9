"""The paper's claim in miniature: do cognition-alignment turns help a model answer ordinary
questions about images?

A synthetic VQA: 32x32 images of one coloured shape (square or disc, 3 sizes, palette of 4) at a
jittered spot in one of 4 quadrants, on a plain grey background. Each record asks, in random
order, "What colour is the shape?" (red / green / blue / yellow) and "Where is the shape?"
(upper left / upper right / lower left / lower right). Train and held-out images differ (no
(colour, quadrant, shape, size, offset) in both).

The train set is expanded once with `cogalign expand --targets px --regions quarters
--px-resolution 4 --resample box` (one RGB turn per record, a 2x2-pixel answer for a random
quarter). Two conditions, per seed:
  plain:   the expanded records with the inserted turns removed (the original LLaVA records);
  cogalign: the expanded records as they are.
Both use the same `tiny` model (same tokenizer, trained on the expanded shards' text, so the
vocabulary and the initial weights are the same), the same seed (init and data order), the same
steps, global batch and rates. Held-out accuracy is on the ordinary questions only: greedy
decoding of each answer given the image and the conversation before it, compared after
lower-casing and dropping punctuation.

python benchmarks/bench_ablation.py            # the README table (3 seeds, 2 conditions)
python benchmarks/bench_ablation.py --quick    # 1 seed, small sizes, 1-2 minutes
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine_lines  # noqa: E402

SIDE = 32
BACKGROUND = (225, 225, 225)
COLOURS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (230, 200, 40)}
POSITIONS = {"upper left": (0, 0), "upper right": (0, 1), "lower left": (1, 0), "lower right": (1, 1)}
QUESTIONS = {"colour": "What colour is the shape?", "position": "Where is the shape?"}
TEMPLATES = {"vq": ["VQ of this image?"], "px": ["RGB of this image?"]}  # one short prompt: short sequences
TINY_LR = ["projector=3e-3", "vision_tower=3e-3", "language_model=3e-3"]
EXPAND = dict(targets="px", regions="quarters", px_resolution=4, resample="box")


def draw(colour: str, position: str, shape: str, size: int, dy: int, dx: int):
    import numpy as np

    arr = np.empty((SIDE, SIDE, 3), np.uint8)
    arr[:] = BACKGROUND
    qy, qx = POSITIONS[position]
    y0, x0 = qy * SIDE // 2 + dy, qx * SIDE // 2 + dx
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    mask = np.ones((size, size), bool) if shape == "square" else (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2
    arr[y0:y0 + size, x0:x0 + size][mask] = COLOURS[colour]
    return arr


def make_set(folder: Path, n: int, seed: int, prefix: str, exclude: set) -> set:
    """`n` records with images nobody in `exclude` has; returns the image keys used."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    keys, records = set(), []
    while len(records) < n:
        size = int(rng.choice([8, 10, 12]))
        key = (str(rng.choice(list(COLOURS))), str(rng.choice(list(POSITIONS))), str(rng.choice(["square", "disc"])),
               size, int(rng.integers(0, SIDE // 2 - size + 1)), int(rng.integers(0, SIDE // 2 - size + 1)))
        if key in exclude or key in keys:
            continue
        keys.add(key)
        name = f"images/{prefix}{len(records):04d}.png"
        Image.fromarray(draw(*key)).save(folder / name)
        answers = {"colour": key[0], "position": key[1]}
        order = list(QUESTIONS) if rng.random() < 0.5 else list(QUESTIONS)[::-1]
        conv = []
        for j, q in enumerate(order):
            conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + QUESTIONS[q]},
                     {"from": "gpt", "value": answers[q]}]
        records.append({"id": f"{prefix}{len(records):04d}", "image": name, "conversations": conv})
    (folder / "data.json").write_text(json.dumps(records))
    return keys


def expand_set(src: Path, out: Path, seed: int) -> None:
    from cogalign.expand.executor import Runtime, expand
    from cogalign.options import ExpandOptions

    templates = src / "templates.json"
    templates.write_text(json.dumps(TEMPLATES))
    result = expand(src / "data.json", out, ExpandOptions(**EXPAND, templates=str(templates), seed=seed),
                    Runtime(workers=0, progress=False))
    if result.counts.get("expanded", 0) == 0 and not list((out / "data").glob("*.parquet")):
        raise SystemExit(f"expand wrote nothing to {out}: {dict(result.counts)}")


def strip_inserted(expanded: Path, plain: Path) -> int:
    """Copy an expand output folder with every inserted (VQ/RGB) question-answer pair removed."""
    import pyarrow.parquet as pq

    from cogalign.train.collate import answer_kind
    from cogalign.train.data import shard_files
    from cogalign.expand.writer import read_shard, rows_to_table, to_row

    shutil.copytree(expanded, plain)
    removed = 0
    for path in shard_files(plain):
        recs = list(read_shard(path))
        for rec in recs:
            turns, keep = rec["conversations"], []
            for i, t in enumerate(turns):
                inserted_answer = t["from"] == "gpt" and answer_kind(t["value"]) != "original"
                inserted_question = t["from"] == "human" and i + 1 < len(turns) and \
                    answer_kind(turns[i + 1]["value"]) != "original"
                if inserted_answer or inserted_question:
                    removed += inserted_answer
                    continue
                keep.append(t)
            rec["conversations"] = keep
        pq.write_table(rows_to_table([to_row(r) for r in recs]), path)
    return removed


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z ]", " ", text.lower()).split())


def ordinary_accuracy(run: Path, test: Path, max_new_tokens: int = 8) -> dict:
    """Greedy answers to every ordinary question of the held-out records, scored per question kind."""
    from cogalign.train.collate import Encoder, answer_kind
    from cogalign.train.data import ShardDataset
    from cogalign.train.generate import greedy_answers, load_run

    model, processor, vq_tokens = load_run(run)
    enc = Encoder(processor, 1024, vq_tokens)
    kind_of = {v: k for k, v in QUESTIONS.items()}
    hits = {k: [] for k in QUESTIONS}
    for item in ShardDataset(test, shuffle=False):
        rec = item["record"]
        if rec is None or item.get("skip"):
            raise SystemExit(f"held-out record unreadable: {item.get('detail') or item.get('skip')}")
        turns = rec["conversations"]
        ordinary = [i for i, t in enumerate(turns) if t["from"] == "gpt" and answer_kind(t["value"]) == "original"]
        for i, answer in zip(ordinary, greedy_answers(model, enc, item, ordinary, max_new_tokens)):
            question = kind_of[turns[i - 1]["value"].replace("<image>", "").strip()]
            hits[question].append(normalise(answer) == normalise(turns[i]["value"]))
    acc = {k: sum(v) / len(v) for k, v in hits.items()}
    acc["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    acc["n"] = sum(len(v) for v in hits.values())
    return acc


def train_one(data: Path, tokenizer_data: Path, out: Path, seed: int, steps: int, batch: int) -> dict:
    from cogalign.train.model import load
    from cogalign.train.run import TrainConfig, train
    from cogalign.train.stages import make_plan

    net, processor = load("tiny", tokenizer_data, seed=seed)
    plan = make_plan(3, lr=TINY_LR, global_batch_size=batch, per_device_batch_size=batch)
    summary = train(TrainConfig(data, out, plan, seed=seed, max_length=256, max_steps=steps, progress=False,
                                log_every=max(1, steps // 10)), net, processor)
    if summary["truncated_records"] or summary["skipped"]:
        raise SystemExit(f"{out}: {summary['truncated_records']} truncated, {summary['skipped']} skipped records")
    last = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])
    return {"train_s": summary["seconds"], "loss_original": last["loss_original"], "loss_px": last["loss_px"]}


def mean_sd(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=256, help="training records (default 256)")
    ap.add_argument("--test", type=int, default=48, help="held-out records, 2 questions each (default 48)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    ap.add_argument("--batch", type=int, default=16, help="global batch, records per step (default 16)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per condition, 0..N-1 (default 3)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 64 train / 16 held-out records, 20 steps")
    ap.add_argument("--keep", type=Path, default=None, help="keep the data and runs in this folder")
    args = ap.parse_args()
    if args.quick:
        args.train, args.test, args.steps, args.seeds = 64, 16, 20, 1
    if min(args.train, args.test, args.steps, args.batch, args.seeds) < 1:
        ap.error("--train, --test, --steps, --batch and --seeds must be at least 1")

    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="cogalign-ablation-")) if args.keep is None else args.keep
    if args.keep is not None:
        if root.exists() and any(root.iterdir()):
            ap.error(f"--keep {root}: folder is not empty")
        root.mkdir(parents=True, exist_ok=True)
    try:
        train_keys = make_set(root / "src-train", args.train, 0, "tr", set())
        make_set(root / "src-test", args.test, 1, "te", train_keys)
        expand_set(root / "src-train", root / "train-cogalign", 0)
        expand_set(root / "src-test", root / "test-expanded", 0)
        removed = strip_inserted(root / "train-cogalign", root / "train-plain")
        strip_inserted(root / "test-expanded", root / "test")
        print(f"data: {args.train} train records ({removed} RGB turns inserted), {args.test} held-out records; "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
        results = {"plain": [], "cogalign": []}
        for seed in range(args.seeds):
            for cond in results:
                t0 = time.perf_counter()
                run = root / f"run-{cond}-{seed}"
                r = train_one(root / f"train-{cond}", root / "train-cogalign", run, seed, args.steps, args.batch)
                r.update(ordinary_accuracy(run, root / "test"), seed=seed, wall_s=time.perf_counter() - t0)
                results[cond].append(r)
                print(f"seed {seed} {cond}: all {r['all']:.3f} colour {r['colour']:.3f} position {r['position']:.3f} "
                      f"({r['wall_s']:.0f} s)", file=sys.stderr)
                shutil.rmtree(run / "checkpoint-" f"{args.steps}", ignore_errors=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - started

    print(f"## bench_ablation: {args.train} train / {args.test} held-out records ({2 * args.test} questions), "
          f"{args.steps} steps at global batch {args.batch}, seeds 0..{args.seeds - 1}\n")
    print("| condition | seed | colour acc | position acc | all acc | final loss (original answers) | final loss (RGB) | run s |")
    print("|---|---|---|---|---|---|---|---|")
    for cond, rs in results.items():
        for r in rs:
            px = f"{r['loss_px']:.3f}" if r["loss_px"] is not None else "-"
            print(f"| {cond} | {r['seed']} | {r['colour']:.3f} | {r['position']:.3f} | {r['all']:.3f} | "
                  f"{r['loss_original']:.3f} | {px} | {r['wall_s']:.0f} |")
    print("\n| condition | runs | colour acc | position acc | all acc (mean ± sd) |")
    print("|---|---|---|---|---|")
    for cond, rs in results.items():
        print(f"| {cond} | {len(rs)} | {mean_sd([r['colour'] for r in rs])} | {mean_sd([r['position'] for r in rs])} | "
              f"{mean_sd([r['all'] for r in rs])} |")
    diffs = [c["all"] - p["all"] for p, c in zip(results["plain"], results["cogalign"])]
    print(f"\npaired difference cogalign - plain (all acc, same seed): {mean_sd(diffs)}; chance 0.25 per question")
    print()
    for key, value in machine_lines() + [("wall time", f"{wall:.0f} s")]:
        print(f"- {key}: {value}")


if __name__ == "__main__":
    main()
