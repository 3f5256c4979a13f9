"""`cogalign generate` batched against one answer at a time, on the same tiny model and prompts.

Data: `--records` 32x32 images of four solid-colour quadrants, each record with two ordinary turn
pairs (an earlier answer of 0 to 120 words, so the prompts differ in length and batches are
left-padded) and one RGB turn spliced in by `cogalign expand --targets px --px-resolution 4`.
Model: a random `tiny` (seed 0; `--layers`, `--hidden`), built once; so answers run to
`--max-new-tokens` unless the model happens to emit its end token. Every batch size runs
`cogalign.train.generate.generate` over the same records (a warm-up pass of 4 records first, then
`--repeats` passes per batch size, interleaved; the median time counts);
batch size 1 is the one-at-a-time baseline, and every batch size's answers are compared with it.

python benchmarks/bench_generate.py                      # CPU, 48 records, batch 1 vs 8 and 16
python benchmarks/bench_generate.py --device cuda --records 256 --batch-sizes 1,8,32
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine_lines  # noqa: E402


def build(root: Path, records: int) -> Path:
    """The expanded output folder (see the module docstring)."""
    import numpy as np

    from cogalign.expand.executor import Runtime, expand
    from cogalign.options import ExpandOptions
    from tests.train_fixtures import quadrant_set

    src = quadrant_set(root / "src", records, 0)
    recs = json.loads(src.read_text())
    rng = np.random.default_rng(0)
    for r in recs:
        r["conversations"] = [{"from": "human", "value": "<image>\nWhat is this?"},
                              {"from": "gpt", "value": " ".join(["Four squares."] * int(rng.integers(0, 60)))},
                              {"from": "human", "value": "And the colours?"},
                              {"from": "gpt", "value": "Red, green, blue and yellow."}]
    src.write_text(json.dumps(recs))
    templates = root / "templates.json"
    templates.write_text(json.dumps({"vq": ["VQ of this image?"], "px": ["RGB of this image?"]}))
    expand(src, root / "out", ExpandOptions(targets="px", regions="quarters", px_resolution=4, vq_resolution=64,
                                            resample="box", templates=str(templates)),
           Runtime(workers=0, progress=False))
    return root / "out"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=48)
    ap.add_argument("--batch-sizes", default="1,8,16", help="comma-separated; the first is the baseline (default 1,8,16)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per batch size, interleaved; the median counts (default 3)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]

    import torch

    from cogalign.train.data import ShardDataset
    from cogalign.train.generate import generate
    from cogalign.train.model import load

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = build(Path(tmp), args.records)
        model, processor = load("tiny", out, seed=0, tiny_layers=args.layers, tiny_hidden=args.hidden)
        model = model.to(args.device).eval()

        def run(batch_size: int, limit: int | None = None):
            items = (it for k, it in enumerate(ShardDataset(out, shuffle=False)) if limit is None or k < limit)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            preds = list(generate(model, processor, items, max_new_tokens=args.max_new_tokens, max_length=4096,
                                  batch_size=batch_size))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return preds, time.perf_counter() - t

        run(max(sizes), 4)  # warm-up
        times = {b: [] for b in sizes}
        results = {}
        for _ in range(args.repeats):  # interleaved, so that the machine's load falls on every size alike
            for b in sizes:
                results[b], s = run(b)
                times[b].append(s)
        results = {b: (results[b], statistics.median(times[b])) for b in sizes}

    base_preds, base_s = results[sizes[0]]
    cut = sum(not p["finished"] for p in base_preds)
    print(f"# cogalign generate: batched vs one at a time ({args.records} records, tiny {args.layers} layers x "
          f"{args.hidden}, --max-new-tokens {args.max_new_tokens}, device {args.device})\n")
    for key, value in machine_lines(args.device):
        print(f"- {key}: {value}")
    print(f"- answers: {len(base_preds)}, {cut} of them run to --max-new-tokens (no end token); "
          f"median of {args.repeats} passes\n")
    print("| batch size | answers | seconds | answers/s | speed-up | answers equal to batch size "
          f"{sizes[0]} |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b in sizes:
        preds, s = results[b]
        same = sum(p == q for p, q in zip(preds, base_preds))
        print(f"| {b} | {len(preds)} | {s:.2f} | {len(preds) / s:.2f} | {base_s / s:.2f}x | {same}/{len(base_preds)} |")


if __name__ == "__main__":
    main()
