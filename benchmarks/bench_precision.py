#!/usr/bin/env python3
"""The VQ encoder alone, per encoder mode (--precision, --channels-last, --compile).

For each mode, on the same 336x336 crops (quarters of the example photos at 672 px):

  regions/s          `tokenizer.encode` in batches of --batch-size, after one warm-up batch
  FLOPs/region       torch.utils.flop_counter on one crop (Encoder + quant_conv; the lookup is
                     not counted), the same for every mode
  of bf16 matmul     achieved FLOP/s (FLOPs/region x regions/s) / the card's measured dense
                     bf16 matmul rate (torch.mm, square, best of a few); also / the fp32 rate
  = fp32             the fraction of indices equal to the fp32 mode's
  batch-invariant    batch 1 == batch --batch-size on the first crops (spec 7)

On the CPU the run also times the encoder input as it was before issue 7 (a permuted NHWC
tensor, channels_last in memory), to compare with the contiguous default in the same run.

  python benchmarks/bench_precision.py --device cuda                  # f8 demo + a vq-f8-sized model
  python benchmarks/bench_precision.py --smoke                        # CPU, a few seconds
  python benchmarks/bench_precision.py --device cpu --regions 16      # CPU figures

Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EXAMPLES, load_average, machine_lines, md_table  # noqa: E402

# latent-diffusion's vq-f8 architecture (the `vqgan-4096` shape) with 4096 codes.
VQ_F8 = {"embed_dim": 4, "n_embed": 4096, "ddconfig": {
    "double_z": False, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [32], "dropout": 0.0}}


def crops(size: int, n: int):
    """n crops of size x size: quarters of the example photos stretched to 2*size, cycled."""
    import numpy as np

    from cogalign.inputs.images import load_image, to_working

    out = []
    paths = sorted((EXAMPLES / "images").iterdir())
    for p in paths:
        img = to_working(load_image(p), (2 * size, 2 * size))
        out += [img[y:y + size, x:x + size] for y in (0, size) for x in (0, size)]
    return np.stack([out[i % len(out)] for i in range(n)])


def random_vq_f8(device: str):
    """A random-weight tokenizer of latent-diffusion's vq-f8 shape; the codebook is spread over
    the encoder's outputs so that many codes are used."""
    import torch

    from cogalign.tokenizers.taming import TamingVQTokenizer

    torch.manual_seed(0)
    tok = TamingVQTokenizer(VQ_F8, name="random-vq-f8")
    with torch.no_grad():
        probe = tok.pre_quant(torch.rand(1, 3, 64, 64) * 2 - 1)
        flat = probe.permute(0, 2, 3, 1).reshape(-1, probe.shape[1])
        w = tok.quantize.embedding.weight
        w.copy_(torch.randn_like(w) * flat.std(0) + flat.mean(0))
    return tok.to_device(device)


def matmul_rate(device: str, dtype_name: str = "bf16", n: int | None = None) -> float:
    """Best dense square matmul rate in FLOP/s."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    n = n or (8192 if device.startswith("cuda") else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / 3)
    return 2 * n ** 3 / best


def flops_per_region(tok, size: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size, device=tok.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        tok.pre_quant(x)
    return int(counter.get_total_flops())


def encode_before_issue7(tok, images):
    """The CPU encode as it was before issue 7: the same one-image-per-thread scheme, but the
    input a bare permute of NHWC pixels (channels_last in memory). For timing and agreement."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    pixels = torch.from_numpy(np.ascontiguousarray(images))
    f = tok.downsample
    out = np.empty((len(images), images.shape[1] // f, images.shape[2] // f), dtype=np.int64)

    def run(i):
        with torch.inference_mode():
            x = pixels[i:i + 1].permute(0, 3, 1, 2).float() / 127.5 - 1.0
            out[i:i + 1] = tok.lookup(tok.pre_quant(x)).numpy()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max(1, threads)) as pool:
            list(pool.map(run, range(len(images))))
    finally:
        torch.set_num_threads(threads)
    return out


def layout_ab(tok, images, rounds: int) -> list[list[str]]:
    """Contiguous input (now) against the pre-issue-7 NHWC-permute input, alternating A/B and
    B/A each round on the same crops, so that a noisy machine's load hits both alike."""
    import statistics

    tok.set_encoder_mode()
    runs = {"contiguous NCHW (now)": [], "NHWC permute (before issue 7)": []}
    fns = {"contiguous NCHW (now)": tok.encode, "NHWC permute (before issue 7)": lambda x: encode_before_issue7(tok, x)}
    order = list(fns)
    fns[order[0]](images[:1]), fns[order[1]](images[:1])  # warm-up
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            fns[name](images)
            runs[name].append(1000 * (time.perf_counter() - t) / len(images))
    base = statistics.median(runs[order[1]])
    return [[tok.name, name, f"{statistics.median(v):.1f}", f"{min(v):.1f}", f"{max(v):.1f}",
             f"{base / statistics.median(v):.2f}x"] for name, v in runs.items()]


def timed(fn, images, batch: int):
    fn(images[:batch])  # warm-up (and compilation, for --compile)
    t = time.perf_counter()
    out = [fn(images[s:s + batch]) for s in range(0, len(images), batch)]
    return time.perf_counter() - t, out


def bench_model(tok, images, args, rate: float, rate32: float) -> list[list[str]]:
    import numpy as np

    modes = [("fp32", False, False), ("bf16", False, False), ("fp16", False, False),
             ("fp32", True, False), ("bf16", True, False)]
    if args.compile:
        modes += [("fp32", False, True), ("bf16", False, True)]
    flops = flops_per_region(tok, images.shape[1])
    rows, ref = [], None
    first = images[:min(len(images), args.batch_size, 8)]
    if tok.device.type == "cpu":
        t, out = timed(lambda x: encode_before_issue7(tok, x), images, args.batch_size)
        legacy = np.concatenate(out)
    for precision, cl, comp in modes:
        label = precision + (" channels_last" if cl else "") + (" compile" if comp else "")
        try:
            tok.set_encoder_mode(precision, cl, comp)
        except Exception as exc:  # noqa: BLE001 - a refused mode is a row, not a crash
            rows.append([tok.name, label, "refused: " + str(exc).split(":")[0][:60], "", "", "", "", "", ""])
            continue
        seconds, out = timed(tok.encode, images, args.batch_size)
        idx = np.concatenate(out)
        if ref is None:
            ref = idx
        singles = np.concatenate([tok.encode(first[i:i + 1]) for i in range(len(first))])
        invariant = bool((singles == tok.encode(first)).all())
        per_s = len(images) / seconds
        rows.append([tok.name, label, f"{per_s:.2f}", f"{1000 * seconds / len(images):.1f}", f"{flops / 1e9:.2f}",
                     f"{100 * flops * per_s / rate:.2f}%", f"{100 * flops * per_s / rate32:.2f}%",
                     f"{100 * (idx == ref).mean():.3f}%", "yes" if invariant else "NO"])
    tok.set_encoder_mode()
    if tok.device.type == "cpu":
        per_s = len(images) / t
        rows.append([tok.name, "fp32, input as before issue 7 (NHWC permute)", f"{per_s:.2f}",
                     f"{1000 * t / len(images):.1f}", f"{flops / 1e9:.2f}", f"{100 * flops * per_s / rate:.2f}%",
                     f"{100 * flops * per_s / rate32:.2f}%", f"{100 * (legacy == ref).mean():.3f}%", "-"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--models", default=None,
                   help="comma-separated: demo (the shipped f8 tokenizer), vq-f8 (random weights, latent-diffusion's "
                        "vq-f8 shape), or a tokenizer path. Default: demo,vq-f8 on cuda, demo on cpu")
    p.add_argument("--size", type=int, default=336, help="crop size (default 336, a 672-px quarter)")
    p.add_argument("--regions", type=int, default=None, help="crops per mode (default 512 on cuda, 16 on cpu)")
    p.add_argument("--batch-size", type=int, default=64, help="regions per encode call (default 64)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile modes (slow to compile)")
    p.add_argument("--layout-ab", type=int, default=0, metavar="ROUNDS",
                   help="CPU only: instead of the modes, time the contiguous input against the pre-issue-7 NHWC input, "
                        "alternating for ROUNDS rounds (medians)")
    p.add_argument("--smoke", action="store_true", help="CPU, demo, 4 crops of 64 px: checks that every path runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.size, args.regions, args.batch_size = "cpu", 64, 4, 4
        args.models = args.models or "demo"
    cuda = args.device.startswith("cuda")
    args.regions = args.regions or (512 if cuda else 16)
    args.models = args.models or ("demo,vq-f8" if cuda else "demo")
    load_before = load_average()

    import torch

    from cogalign.tokenizers import load_tokenizer

    images = crops(args.size, args.regions)
    if args.layout_ab:
        rows = []
        for spec in args.models.split(","):
            tok = random_vq_f8("cpu") if spec == "vq-f8" else load_tokenizer(spec, device="cpu")
            rows += layout_ab(tok, images, args.layout_ab)
        print(f"\n### Encoder input layout, fp32, CPU: {args.regions} crops of {args.size}x{args.size}, "
              f"{args.layout_ab} alternating rounds\n")
        print(md_table(["tokenizer", "input", "median ms/region", "min", "max", "speed vs before"], rows))
        print()
        print(md_table(["", ""], [*[[k, v] for k, v in machine_lines("cpu")],
                                  ["load average before / after", f"{load_before} / {load_average()}"]]))
        return 0
    rate = matmul_rate(args.device, "bf16", 512 if args.smoke else None)
    rate32 = matmul_rate(args.device, "fp32", 512 if args.smoke else None)  # TF32 off: true fp32
    rows = []
    for spec in args.models.split(","):
        tok = random_vq_f8(args.device) if spec == "vq-f8" else load_tokenizer(spec, device=args.device)
        rows += bench_model(tok, images, args, rate, rate32)
    print(f"\n### Encoder modes: {args.regions} crops of {args.size}x{args.size}, batches of {args.batch_size}, "
          f"device {args.device}\n")
    print(md_table(["tokenizer", "mode", "regions/s", "ms/region", "GFLOPs/region", "of bf16 matmul rate",
                    "of fp32 matmul rate", "= fp32 indices", "batch 1 == batch N"], rows))
    print()
    print(md_table(["", ""], [["measured dense bf16 / fp32 matmul rate",
                               f"{rate / 1e12:.3f} / {rate32 / 1e12:.3f} TFLOP/s"],
                              ["torch threads", str(torch.get_num_threads())],
                              *[[k, v] for k, v in machine_lines(args.device)],
                              ["load average before / after", f"{load_before} / {load_average()}"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
