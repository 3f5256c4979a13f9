"""`cogalign train`'s data path + trainer against a plain `transformers.Trainer`, and memory with and
without gradient checkpointing.

Data: N synthetic 32x32 images (four coloured quadrants), each expanded with one RGB turn
(`--px-resolution 8`, so about 450 tokens per record). Model: `tiny` (CLIP-style tower, projector,
Llama-style LM) of --hidden / --layers, the same seed and so the same weights in every run.

- cogalign: `cogalign.train.run.train` (CogalignTrainer): reads each record from the shards, loads
  and preprocesses its image, renders and tokenizes the conversation, splits the loss by kind.
- plain: `transformers.Trainer` on the same model, fed the very same batches (same records, same
  order, built once by our collator beforehand and handed over as they are), with the model's own loss.
Each configuration runs in its own process (its peak RSS is its memory; on a GPU the peak
allocated memory). Samples/s and tokens/s count the records and non-padding tokens of the steps.

python benchmarks/bench_train.py                    # the README table (CPU)
python benchmarks/bench_train.py --device cuda      # on a GPU (bf16)
python benchmarks/bench_train.py --quick            # a few steps, smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine_lines, md_table  # noqa: E402

PALETTE = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (230, 220, 40)]
LR = ["projector=1e-3", "vision_tower=1e-3", "language_model=1e-3"]


def make_data(root: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    from cogalign.expand.executor import Runtime, expand
    from cogalign.options import ExpandOptions

    src = root / "src"
    (src / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        arr = np.zeros((32, 32, 3), np.uint8)
        for (y, x), c in zip([(0, 0), (0, 16), (16, 0), (16, 16)], rng.integers(0, 4, 4)):
            arr[y:y + 16, x:x + 16] = PALETTE[c]
        Image.fromarray(arr).save(src / "images" / f"q{i:04d}.png")
        records.append({"id": f"q{i:04d}", "image": f"images/q{i:04d}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "Four squares."}]})
    (src / "data.json").write_text(json.dumps(records))
    (src / "templates.json").write_text(json.dumps({"vq": ["VQ of this image?"], "px": ["RGB of this image?"]}))
    out = root / "out"
    expand(src / "data.json", out, ExpandOptions(targets="px", px_resolution=8, vq_resolution=64,
                                                 templates=str(src / "templates.json"), regions="quarters",
                                                 resample="box"), Runtime(workers=0, progress=False))
    return out


def child(a) -> dict:
    import torch

    from cogalign.train.args import checkpointing_field
    from cogalign.train.collate import Collator, Encoder
    from cogalign.train.data import PAD, EpochSampler, ShardDataset
    from cogalign.train.model import load
    from cogalign.train.run import TrainConfig, train
    from cogalign.train.stages import make_plan

    torch.set_num_threads(a.threads)
    data, out = Path(a.data), Path(a.out)
    gpu = a.device == "cuda"
    net, processor = load("tiny", data, seed=0, tiny_layers=a.layers, tiny_hidden=a.hidden)
    plan = make_plan(3, lr=LR, global_batch_size=a.batch, per_device_batch_size=a.batch)
    options = {checkpointing_field(): a.checkpointing or None, "bf16": gpu or None}
    # the batches of the run, as our collator builds them (same sampler, same order)
    ds = ShardDataset(data)
    sampler, order = EpochSampler(len(ds), 0, a.batch), []
    for epoch in range(-(-a.steps * a.batch // len(sampler))):
        sampler.set_epoch(epoch)
        order += list(sampler)
    order = order[: a.steps * a.batch]
    collate = Collator(Encoder(processor, a.max_length))
    batches = [collate([ds[i] for i in order[s:s + a.batch] if i != PAD]) for s in range(0, len(order), a.batch)]
    samples = sum(int(b["input_ids"].shape[0]) for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    if gpu:
        net = net.cuda()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if a.mode == "cogalign":
        summary = train(TrainConfig(data, out, plan, max_length=a.max_length, max_steps=a.steps, progress=False,
                                    log_every=a.steps, save_every=10 ** 6, workers=a.workers, options=options),
                        net, processor)
        seconds = summary["seconds"]
    else:
        from transformers import Trainer, TrainingArguments

        plain = [{k: b[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")} for b in batches]
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=1, max_steps=a.steps,
                                 learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.03,
                                 save_strategy="no", report_to=[], remove_unused_columns=False, disable_tqdm=True,
                                 use_cpu=not gpu, dataloader_pin_memory=False, logging_steps=a.steps,
                                 **{k: v for k, v in options.items() if v is not None})
        trainer = Trainer(model=net, args=args, train_dataset=plain, data_collator=lambda items: items[0])
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "samples": samples, "tokens": tokens, "peak_mib": peak / 2 ** 20,
            "growth_mib": (peak - before) / 2 ** 20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=96)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration; the best time counts")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    if a.quick:
        a.records, a.steps, a.hidden, a.layers, a.repeats = 16, 4, 64, 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), a.records)
        runs = [("cogalign train", "cogalign", False, 0), ("plain Trainer, same batches", "plain", False, 0),
                ("cogalign train, 1 DataLoader worker", "cogalign", False, 1),
                ("cogalign train + gradient checkpointing", "cogalign", True, 0)]
        results = {}
        for r in range(a.repeats):  # interleaved, so a busy spell on the machine hits every configuration
            for name, mode, ckpt, workers in runs:
                cmd = [sys.executable, __file__, "--child", "1", "--mode", mode, "--data", str(data),
                       "--out", f"{tmp}/{mode}-{int(ckpt)}-{workers}-{r}", "--workers", str(workers), "--steps", str(a.steps), "--batch", str(a.batch),
                       "--hidden", str(a.hidden), "--layers", str(a.layers), "--max-length", str(a.max_length),
                       "--threads", str(a.threads), "--device", a.device] + (["--checkpointing"] if ckpt else [])
                env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                if name not in results or res["seconds"] < results[name]["seconds"]:
                    results[name] = res
    base = results["plain Trainer, same batches"]
    rows = []
    for name, r in results.items():
        rows.append([name, f"{r['samples'] / r['seconds']:.1f}", f"{r['tokens'] / r['seconds']:.0f}",
                     f"{base['seconds'] / r['seconds']:.2f}", f"{r['peak_mib']:.0f}", f"{r['growth_mib']:.0f}"])
    print("\n".join(f"- {k}: {v}" for k, v in machine_lines(a.device)))
    print(f"- tiny model hidden {a.hidden}, {a.layers} layers; {a.steps} steps of batch {a.batch}; "
          f"{base['samples']} records, {base['tokens']} tokens; best of {a.repeats}; torch threads {a.threads}\n")
    mem = ["peak GPU MiB", "peak above the loaded model"] if a.device == "cuda" else \
        ["peak RSS MiB", "RSS growth during training"]
    print(md_table(["run", "samples/s", "tokens/s", "speed vs plain", *mem], rows))


if __name__ == "__main__":
    main()
