#!/usr/bin/env python3
"""Peak memory of `cogalign expand` on a LLaVA-665K/790K-sized JSON, against `json.load`.

Generates (once, cached under --data-dir, default /tmp/cogalign-membench) a synthetic LLaVA
JSON array shaped like the 790K mix: mostly text-only records with realistic conversation
lengths, one record in --image-every pointing at an example photo (copied under the data
folder, which is the image root). Then runs, each in its own subprocess:

  a) python -c "import json; json.load(open(FILE))"      what LLaVA's trainer does
  b) python -m cogalign expand FILE --out DIR --targets px --px-resolution 8 --workers 1 --no-progress
     (RGB target only, so no VQ model is needed; text-only records pass through)

and samples the PSS of the whole process tree (the process and every descendant, workers
included) every --interval seconds (default 0.1). PSS divides shared pages among the
processes that map them, so the sum counts each page once. It also reads the main process's
max RSS from wait4, which a spike shorter than the sampling period cannot escape. Prints a
markdown table.

  python benchmarks/bench_memory.py                      # 790K records, about 1.1 GB
  python benchmarks/bench_memory.py --records 100000     # a quick try
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EXAMPLES, load_average, machine_lines, md_table, run_measured  # noqa: E402

WORDS = ("the a an of in on at to with and or is are was were this that these those there it its image "
         "picture photo shows showing man woman person people child dog cat car bus train street road "
         "building sky tree grass water table plate food pizza sandwich bowl cup glass bottle chair room "
         "kitchen bedroom window door sign text red blue green yellow white black brown orange large small "
         "two three several many left right top bottom center background foreground standing sitting "
         "holding walking looking wearing shirt hat jacket field game ball player team snow beach ocean "
         "boat sand mountain bird horse cow sheep elephant giraffe zebra umbrella bag phone laptop screen "
         "keyboard book shelf clock wall light lamp bed couch pillow toilet sink mirror counter oven "
         "refrigerator what where how many why which color does do can you describe detail").split()
QUESTIONS = ("What is the man holding?", "How many people are in the image?", "What color is the bus?",
             "Describe the image concisely.", "What is written on the sign?", "Is the dog sitting or standing?",
             "Provide a one-sentence caption for the provided image.",
             "Answer the question using a single word or phrase.", "What is the main focus of this photograph?",
             "Please describe the scene in detail.", "Where is the cat?", "Who wrote this book?",
             "What type of food is on the plate?", "What time of day does it appear to be?")


def _sentence_pool(rng, n: int) -> list[str]:
    lengths = rng.integers(4, 22, size=n)
    picks = rng.integers(0, len(WORDS), size=int(lengths.sum()))
    out, pos = [], 0
    for length in lengths:
        words = [WORDS[i] for i in picks[pos:pos + length]]
        pos += length
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + ".")
    return out


def generate(path: Path, n: int, image_every: int, seed: int = 0) -> None:
    """Write n LLaVA records as one JSON array (LLaVA-style indentation-free, one record per line)."""
    import numpy as np
    import orjson

    rng = np.random.default_rng(seed)
    sentences = _sentence_pool(rng, 50_000)
    photos = sorted(p.name for p in (EXAMPLES / "images").iterdir())
    # Pair counts like the 665K mix: many single-turn records, VQA records with up to ~10 pairs.
    pair_counts = rng.choice([1, 1, 1, 2, 3, 4, 5, 6, 8, 10], size=n)
    # Answers: short VQA answers, one-sentence captions, and long detailed descriptions.
    kinds = rng.choice([0, 0, 0, 1, 1, 2], size=int(pair_counts.sum()))
    picks = rng.integers(0, len(sentences), size=(int(pair_counts.sum()), 12))
    qpick = rng.integers(0, len(QUESTIONS), size=int(pair_counts.sum()))
    tmp = path.with_suffix(".tmp")
    t = 0
    with open(tmp, "wb") as f:
        f.write(b"[\n")
        for i in range(n):
            conv = []
            for j in range(int(pair_counts[i])):
                q = QUESTIONS[qpick[t]]
                kind = kinds[t]
                if kind == 0:
                    a = " ".join(sentences[picks[t, 0]].split()[:3]).rstrip(".")
                elif kind == 1:
                    a = sentences[picks[t, 0]] + " " + sentences[picks[t, 1]]
                else:
                    a = " ".join(sentences[k] for k in picks[t])
                conv.append({"from": "human", "value": ("<image>\n" + q) if j == 0 else q})
                conv.append({"from": "gpt", "value": a})
                t += 1
            record = {"id": f"{i:09d}"}
            if i % image_every == 0:
                record["image"] = "images/" + photos[(i // image_every) % len(photos)]
            else:
                conv[0]["value"] = conv[0]["value"].replace("<image>\n", "")
            record["conversations"] = conv
            f.write(orjson.dumps(record))
            f.write(b",\n" if i + 1 < n else b"\n")
        f.write(b"]\n")
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=790_000)
    p.add_argument("--image-every", type=int, default=2000, help="one record in this many has an image")
    p.add_argument("--data-dir", default="/tmp/cogalign-membench", help="where the synthetic JSON is cached (never the repo)")
    p.add_argument("--interval", type=float, default=0.1, help="PSS sampling period, seconds")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--skip-json-load", action="store_true")
    p.add_argument("--expand-args", default="",
                   help="extra `cogalign expand` options; default none, i.e. what users run by default "
                        "(VQ and RGB targets, demo tokenizer, 672 px). The 2026-11-27 tables before this "
                        "option used '--targets px --px-resolution 8'")
    args = p.parse_args(argv)

    load_before = load_average()
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    images = data_dir / "images"
    if not images.is_dir():
        shutil.copytree(EXAMPLES / "images", images)
    path = data_dir / f"llava_{args.records}_every{args.image_every}.json"
    if not path.is_file():
        t0 = time.perf_counter()
        generate(path, args.records, args.image_every)
        print(f"generated {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
    size = path.stat().st_size
    n_images = len(range(0, args.records, args.image_every))

    rows = []
    results = {}
    if not args.skip_json_load:
        cmd = [sys.executable, "-c", f"import json; data = json.load(open({str(path)!r})); print(len(data))"]
        rc, sec, peak, procs, maxrss, err = run_measured(cmd, args.interval)
        if rc:
            raise SystemExit(f"json.load failed ({rc}): {err}")
        results["json"] = peak
        rows.append(["`json.load` (one Python list)", f"{peak / 2**20:,.0f}", f"{maxrss / 2**20:,.0f}",
                     f"{sec:.1f}", procs])

    out = data_dir / "out"
    shutil.rmtree(out, ignore_errors=True)
    extra = args.expand_args.split()
    cmd = [sys.executable, "-m", "cogalign", "expand", str(path), "--out", str(out), *extra,
           "--workers", str(args.workers), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    rc, sec, peak, procs, maxrss, err = run_measured(cmd, args.interval, env=env)
    if rc:
        raise SystemExit(f"cogalign expand failed ({rc}): {err}")
    report = json.loads((out / "report.json").read_text())
    out_bytes = sum(f.stat().st_size for f in (out / "data").iterdir())
    results["expand"] = peak
    results["expand_rss"] = maxrss
    shown = " ".join(["cogalign expand", *extra, "--workers", str(args.workers)])
    rows.append([f"`{shown}` (whole tree)",
                 f"{peak / 2**20:,.0f}", f"{maxrss / 2**20:,.0f}", f"{sec:.1f}", procs])
    shutil.rmtree(out, ignore_errors=True)

    print(f"Input: {path} — {args.records:,} records, {size / 1e9:.2f} GB, {n_images:,} with an image "
          f"(1 in {args.image_every}); expand: {report.get('expanded')} expanded, {report.get('passed')} passed, "
          f"{report.get('rejected')} rejected, {out_bytes / 1e6:.0f} MB of parquet.\n")
    print(md_table(["command", "peak PSS of the process tree (MiB)", "max RSS of the main process (MiB)",
                    "wall (s)", "processes at the PSS peak"], rows))
    if "json" in results:
        print(f"\npeak PSS, expand / json.load: **{results['expand'] / results['json']:.2f}**; "
              f"target: expand at most 1 GB: **{'met' if results['expand'] <= 1e9 else 'NOT met'}** "
              f"({results['expand'] / 1e9:.2f} GB)")
    if results["expand_rss"] > 1e9:
        print(f"\nNote: expand's main process alone reached {results['expand_rss'] / 1e9:.2f} GB RSS (wait4), "
              "over 1 GB: the PSS sampling may have missed a short spike.")
    print()
    extra = [[k, v] for k, v in machine_lines()] + [["load average before / after", f"{load_before} / {load_average()}"],
                                                     ["PSS sampling period", f"{args.interval} s"]]
    print(md_table(["machine", ""], extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
