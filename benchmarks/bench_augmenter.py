"""Per-record cost of `cogalign.Augmenter` (the on-the-fly path of a training collator) against
`cogalign expand --workers 0` on the same records, both on one CPU thread, at the defaults
(672 px, VQ + RGB, quarters, demo tokenizer). Prints a markdown table.

    python benchmarks/bench_augmenter.py [--records 26] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=26)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from cogalign import Augmenter, ExpandOptions, Runtime, run_expand
    from cogalign.expand.writer import dumps
    from common import load_average, machine_lines

    examples = REPO / "examples"
    images = [r for r in json.loads((examples / "llava_mini.json").read_text()) if "image" in r]
    records = [{**images[i % len(images)], "id": f"r{i}"} for i in range(args.records)]
    options = ExpandOptions(format="jsonl")  # the defaults otherwise
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.json"
        src.write_text(json.dumps(records))
        started = time.perf_counter()
        run_expand(src, Path(tmp) / "out", options, Runtime(workers=0, progress=False, device="cpu"),
                   image_root=examples)
        expand_s = time.perf_counter() - started
        lines = b"".join(p.read_bytes() for p in sorted((Path(tmp) / "out" / "data").glob("*.jsonl"))).splitlines()
    aug = Augmenter(options, image_root=examples, device="cpu")
    aug.add_turns(records[0], 0)  # warm-up (first call allocations)
    started = time.perf_counter()
    got = [dumps(aug.add_turns(r, i)) for i, r in enumerate(records)]
    one_s = time.perf_counter() - started
    started = time.perf_counter()
    batch = [dumps(r) for r in aug.add_turns_batch(records, range(len(records)))]
    batch_s = time.perf_counter() - started
    n = len(records)
    print(f"{n} image records, defaults (672 px, VQ + RGB, quarters, demo tokenizer), "
          f"{args.threads} torch thread(s); load average {load_average()} (a machine shared with other work)")
    for key, value in machine_lines():
        print(f"- {key}: {value}")
    print()
    print("| path | s / record | vs expand --workers 0 | equal to expand's records |")
    print("|---|---|---|---|")
    base = expand_s / n
    for name, seconds, out in (("expand --workers 0 (whole run, start-up included)", expand_s, lines),
                               ("Augmenter.add_turns, one record at a time", one_s, got),
                               ("Augmenter.add_turns_batch, all at once", batch_s, batch)):
        print(f"| {name} | {seconds / n:.3f} | {base / (seconds / n):.2f}x | {out == lines} |")


if __name__ == "__main__":
    main()
