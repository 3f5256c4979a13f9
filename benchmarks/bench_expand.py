#!/usr/bin/env python3
"""Throughput of `cogalign expand` against the loop a researcher would write, in one run.

Same records, same tokenizer weights, one process (plus expand's own workers):

  a) baseline   one record at a time: PIL decode, resize, taming's own Encoder + quant_conv +
                VectorQuantizer (batch of 1), `str(arr.reshape(-1, 3).tolist())`, ", ".join of
                the indices, the LLaVA record appended to a list, `json.dump` at the end.
  b) expand     `cogalign.expand.executor.expand` at the paper's settings (672 px, quarter regions,
                one VQ and one RGB pair per image record), the whole call timed. Its fixed
                start-up (tokenizer load, worker spawn, output folder and report) is measured
                by running the same call on a one-record, text-only input.
  c) encoder    the tokenizer alone (eager float32) on the exact VQ crops expand encoded, in
                batches of --batch-size after one warm-up batch.
  d) renderer   `cogalign.targets.render.px_list_text` against `str(tolist())` on 336x336 regions.

Prints a markdown table. Nothing is written under the repository; inputs and outputs live in
a temporary folder.

  python benchmarks/bench_expand.py                       # CPU, 48 records, demo tokenizer
  python benchmarks/bench_expand.py --device cuda --records 96 --workers 12 --batch-size 64

Only the standard library is imported at module level: expand's worker processes are
spawned and re-import this file.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EXAMPLES, load_average, machine_lines, make_random_taming, md_table  # noqa: E402

QUARTERS = ("upper-left", "upper-right", "lower-left", "lower-right")
PHRASE = {q: f"the {q.replace('-', ' ')} quarter of this image" for q in QUARTERS}


def quarter_box(name: str, h: int, w: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a quarter; the baseline's own copy, f-aligned at 672 for f=8."""
    hh, hw = h // 2, w // 2
    x0 = 0 if "left" in name else hw
    y0 = 0 if "upper" in name else hh
    return x0, y0, x0 + hw, y0 + hh


# ---------------------------------------------------------------------------------- input

def make_input(folder: Path, n: int, seed: int = 0) -> Path:
    """n LLaVA records cycling over the example photos, each with 1-3 QA pairs."""
    source = [r for r in json.loads((EXAMPLES / "llava_mini.json").read_text()) if "image" in r]
    pairs = [(r["conversations"][i]["value"].replace("<image>\n", ""), r["conversations"][i + 1]["value"])
             for r in source for i in range(0, len(r["conversations"]), 2)]
    rng = random.Random(seed)
    records = []
    for i in range(n):
        base = source[i % len(source)]
        k = rng.randint(1, 3)
        chosen = [pairs[(i * 7 + j * 3) % len(pairs)] for j in range(k)]
        conv = []
        for j, (q, a) in enumerate(chosen):
            conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q}, {"from": "gpt", "value": a}]
        records.append({"id": f"{base['id']}-{i:05d}", "image": base["image"], "conversations": conv})
    path = folder / "input.json"
    path.write_text(json.dumps(records, indent=1))
    return path


# ------------------------------------------------------------------------------- baseline

def build_taming_modules(tokenizer, device):
    """taming's own Encoder, quant_conv and VectorQuantizer, with the tokenizer's weights."""
    import contextlib
    import io

    import torch
    from taming.modules.diffusionmodules.model import Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer

    params = tokenizer.params
    with contextlib.redirect_stdout(io.StringIO()):
        encoder = Encoder(**params["ddconfig"])
    quant_conv = torch.nn.Conv2d(params["ddconfig"]["z_channels"], params["embed_dim"], 1)
    quantize = VectorQuantizer(params["n_embed"], params["embed_dim"], beta=0.25)
    sd = tokenizer.state_dict()
    for prefix, module in (("encoder.", encoder), ("quant_conv.", quant_conv), ("quantize.", quantize)):
        module.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    return [m.to(device).eval() for m in (encoder, quant_conv, quantize)]


def run_baseline(records: list[dict], image_root: Path, out_path: Path, modules, device, res: int, seed: int):
    """The one-record-at-a-time loop. -> (seconds, output records' RGB texts by id)."""
    import numpy as np
    import torch
    from PIL import Image

    encoder, quant_conv, quantize = modules
    out = []
    start = time.perf_counter()
    for i, record in enumerate(records):
        rng = random.Random(seed * 1_000_003 + i)
        image = Image.open(image_root / record["image"]).convert("RGB").resize((res, res), Image.BICUBIC)
        arr = np.asarray(image)
        vq_q, px_q = rng.choice(QUARTERS), rng.choice(QUARTERS)
        x0, y0, x1, y1 = quarter_box(vq_q, res, res)
        crop = arr[y0:y1, x0:x1]
        # contiguous NCHW, as taming's VQModel.get_input makes it (to(memory_format=contiguous_format))
        x = (torch.from_numpy(np.ascontiguousarray(crop)).to(device).permute(2, 0, 1)[None].float() / 127.5
             - 1.0).contiguous()
        with torch.no_grad():
            _, _, (_, _, indices) = quantize(quant_conv(encoder(x)))
        vq_answer = "<vq start>" + ", ".join(map(str, indices.view(-1).cpu().tolist())) + "<vq end>"
        x0, y0, x1, y1 = quarter_box(px_q, res, res)
        px_answer = "<rgb start>" + str(arr[y0:y1, x0:x1].reshape(-1, 3).tolist()) + "<rgb end>"
        n = (crop.shape[0] // 8) * (crop.shape[1] // 8)
        vq_question = (f"Can you provide the VQ indices of {PHRASE[vq_q]}? "
                       f"Note that the image resolution is [3, {res}, {res}], so you should generate {n} indices")
        px_question = (f"What are the RGB values of {PHRASE[px_q]}? "
                       f"Note that the image resolution is [3, {res}, {res}].")
        conv = list(record["conversations"])
        n_pairs = len(conv) // 2
        for question, answer in ((vq_question, vq_answer), (px_question, px_answer)):
            pos = 2 * rng.randint(1, n_pairs)
            conv[pos:pos] = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            n_pairs += 1
        out.append({**record, "conversations": conv})
    with open(out_path, "w") as f:
        json.dump(out, f)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------- expand

def run_expand(input_path: Path, out_dir: Path, vq: str, args, image_root: Path) -> float:
    from cogalign.expand.executor import Runtime, expand
    from cogalign.options import ExpandOptions

    options = ExpandOptions(vq=vq, vq_resolution=(args.resolution,) * 2, px_resolution=(args.resolution,) * 2,
                            format=args.format)
    runtime = Runtime(workers=args.workers, batch_size=args.batch_size, device=args.device, progress=False,
                      overwrite=True)
    start = time.perf_counter()
    result = expand(input_path, out_dir, options, runtime, image_root)
    seconds = time.perf_counter() - start
    if not result.finalized:
        raise SystemExit(f"expand did not finish: {result}")
    return seconds


def read_output(out_dir: Path) -> list[dict]:
    from cogalign.expand.writer import read_shard

    return [r for f in sorted((out_dir / "data").iterdir()) for r in read_shard(f)]


def turn_answer(record: dict, tag: str) -> str:
    (answer,) = [t["value"] for t in record["conversations"] if t["from"] == "gpt" and t["value"].startswith(tag)]
    return answer


# ------------------------------------------------------------------------------- torchrun

def torchrun_check(input_path: Path, tmp: Path, vq: str, args, shard_size: int = 4):
    """`cogalign expand` as one process and as `torchrun --nproc-per-node 2` (CPU, gloo), same
    input and options. -> (seconds one, seconds two, data and report identical?, shards differing)."""
    import hashlib
    import socket
    import subprocess

    def digest(out: Path) -> dict:
        files = sorted((out / "data").iterdir()) + [out / "report.json"]
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    common = ["-m", "cogalign", "expand", str(input_path), "--vq", vq, "--image-root", str(EXAMPLES),
              "--vq-resolution", str(args.resolution), "--px-resolution", str(args.resolution),
              "--shard-size", str(shard_size), "--batch-size", str(args.batch_size), "--device", "cpu",
              "--format", args.format, "--no-progress", "--overwrite"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    runs = {}
    for label, launcher, workers in (
            ("one", [sys.executable], args.workers),
            ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                     "--master-port", str(port)], max(0, args.workers // 2))):
        out = tmp / f"torchrun_{label}"
        start = time.perf_counter()
        proc = subprocess.run(launcher + common + ["--out", str(out), "--workers", str(workers)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{label}: exit {proc.returncode}: {proc.stderr[-2000:]}")
        runs[label] = (time.perf_counter() - start, digest(out))
    one, two = runs["one"][1], runs["two"][1]
    differing = sorted(k for k in one if one.get(k) != two.get(k))
    return runs["one"][0], runs["two"][0], one == two, differing


# ------------------------------------------------------------------------------- renderer

def bench_renderer(image_root: Path, records: list[dict], res: int, reps: int):
    import numpy as np

    from cogalign.inputs.images import load_image, to_working
    from cogalign.targets.render import px_list_text

    crops = []
    for record in records[:4]:
        arr = to_working(load_image(image_root / record["image"]), (res, res))
        crops.append(np.ascontiguousarray(arr[: res // 2, : res // 2]))
    t_str, t_fast, size = [], [], 0
    for _ in range(reps):
        for crop in crops:
            t0 = time.perf_counter()
            ref = str(crop.reshape(-1, 3).tolist())
            t1 = time.perf_counter()
            fast = px_list_text(crop)
            t2 = time.perf_counter()
            if fast != ref:
                raise SystemExit("px_list_text differs from str(tolist())")
            t_str.append(t1 - t0)
            t_fast.append(t2 - t1)
            size = len(ref)
    return statistics.median(t_str), statistics.median(t_fast), size


# ------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=48, help="image records (cycling over the 13 example photos)")
    p.add_argument("--vq", default="demo", help="tokenizer spec: a preset or a taming checkpoint folder. If 'demo' "
                   "is not installed, a random-weight model of the demo architecture is used (timing only), "
                   "and the table says so")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)),
                   help="expand's decoding workers (default: cores - 1, as the CLI)")
    p.add_argument("--batch-size", type=int, default=32, help="expand's and the encoder benchmark's batch size")
    p.add_argument("--resolution", type=int, default=672, help="VQ and RGB working resolution")
    p.add_argument("--format", default="parquet", choices=("parquet", "jsonl", "json"), help="expand's output format")
    p.add_argument("--renderer-reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--agreement", action="store_true",
                   help="also encode the crops on the CPU and report the fraction of indices equal to --device's")
    p.add_argument("--torchrun", action="store_true",
                   help="also run the CLI as one process and as torchrun --nproc-per-node 2 on the CPU (shards "
                        "of 4 records) and compare the bytes")
    p.add_argument("--skip-baseline", action="store_true", help="skip the baseline loop (quick tries)")
    p.add_argument("--keep", default=None, help="keep the temporary folder here instead of deleting it")
    args = p.parse_args(argv)

    load_before = load_average()
    tmp_obj = None
    if args.keep:
        tmp = Path(args.keep)
        tmp.mkdir(parents=True, exist_ok=True)
    else:
        tmp_obj = tempfile.TemporaryDirectory(prefix="cogalign-bench-")
        tmp = Path(tmp_obj.name)
    try:
        return _main(args, tmp, load_before)
    finally:
        if tmp_obj is not None:
            tmp_obj.cleanup()


def _main(args, tmp: Path, load_before: str) -> int:
    t_import = time.perf_counter()
    import numpy as np
    import torch

    from cogalign.inputs.images import load_image, to_working
    from cogalign.targets.regions import Region
    from cogalign.targets.render import parse_vq, vq_list_text
    from cogalign.tokenizers import load_tokenizer
    from cogalign.tokenizers.presets import DEMO_DIR
    t_import = time.perf_counter() - t_import

    notes = []
    vq = args.vq
    if vq == "demo" and not (DEMO_DIR / "model.safetensors").is_file():
        vq = str(make_random_taming(tmp / "random-demo-arch"))
        notes.append(f"the demo tokenizer is not installed ({DEMO_DIR}); a random-weight model of its "
                     "architecture (taming f8, ch 32, ch_mult 1-2-2-4, 1 res block, 4096 codes) stood in: "
                     "same cost, meaningless codes")
    device = torch.device(args.device)
    res = args.resolution
    image_root = EXAMPLES
    input_path = make_input(tmp, args.records, args.seed)
    records = json.loads(input_path.read_text())
    text_only = tmp / "text_only.json"
    text_only.write_text(json.dumps([{"id": "t", "conversations": [{"from": "human", "value": "hi"},
                                                                   {"from": "gpt", "value": "hello"}]}]))

    t_load = time.perf_counter()
    tokenizer = load_tokenizer(vq, device=device)
    t_load = time.perf_counter() - t_load
    arch = tokenizer.params["ddconfig"]
    tok_desc = (f"{tokenizer.name} (f{tokenizer.downsample}, {tokenizer.codebook_size} codes, ch {arch['ch']}, "
                f"ch_mult {arch['ch_mult']}, {arch['num_res_blocks']} res block(s), "
                f"{tokenizer.parameter_count() / 1e6:.2f} M params)")

    # a) baseline
    if not args.skip_baseline:
        modules = build_taming_modules(tokenizer, device)
        warm = np.zeros((1, 3, res // 2, res // 2), np.float32)
        with torch.no_grad():
            modules[2](modules[1](modules[0](torch.from_numpy(warm).to(device))))  # one-off allocator warm-up
        t_base = run_baseline(records, image_root, tmp / "baseline.json", modules, device, res, args.seed)
        base_bytes = (tmp / "baseline.json").stat().st_size
        (tmp / "baseline.json").unlink()
        del modules
    else:
        t_base, base_bytes = float("nan"), 0

    # b) expand: start-up on a one-record text-only input, then the N records
    t_start = run_expand(text_only, tmp / "out_startup", vq, args, image_root)
    t_exp = run_expand(input_path, tmp / "out", vq, args, image_root)
    out_records = read_output(tmp / "out")
    out_bytes = sum(f.stat().st_size for f in (tmp / "out" / "data").iterdir())

    # c) pure encoder on the crops expand encoded (boxes from its provenance); RGB texts checked
    crops, px_equal, px_checked, expected_idx = [], 0, 0, []
    for record in out_records:
        meta = record["cogalign"]
        image = load_image(image_root / record["image"])
        work = to_working(image, (res, res))
        for turn in meta["turns"]:
            region = Region(turn["region"], tuple(turn["box"]))
            crop = np.ascontiguousarray(region.crop(work))
            if turn["kind"] == "vq":
                crops.append(crop)
                expected_idx.append(parse_vq(turn_answer(record, "<vq start>")))
            else:  # the baseline's own decode and str(list) of the same box
                from PIL import Image

                arr = np.asarray(Image.open(image_root / record["image"]).convert("RGB").resize((res, res), Image.BICUBIC))
                x0, y0, x1, y1 = turn["box"]
                px_checked += 1
                px_equal += turn_answer(record, "<rgb start>") == (
                    "<rgb start>" + str(arr[y0:y1, x0:x1].reshape(-1, 3).tolist()) + "<rgb end>")
    stack = np.stack(crops)
    bs = args.batch_size
    tokenizer.encode(stack[:bs])  # warm-up batch
    t0 = time.perf_counter()
    grids = [tokenizer.encode(stack[s:s + bs]) for s in range(0, len(stack), bs)]
    t_enc = time.perf_counter() - t0
    grids = np.concatenate(grids)
    vq_equal = sum(np.array_equal(g.reshape(-1), e) for g, e in zip(grids, expected_idx))
    # batch 1: its speed, whether indices depend on the batch, and taming's own quantizer on the same crops
    k = min(len(crops), 16)
    t0 = time.perf_counter()
    singles = np.concatenate([tokenizer.encode(stack[i:i + 1]) for i in range(k)])
    t_enc1 = (time.perf_counter() - t0) / k
    batch_same = float((singles == grids[:k]).mean())
    modules = build_taming_modules(tokenizer, device)
    taming_same, taming_total = 0, 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # taming's own result moves with the thread count; the reference is one thread
    try:
        with torch.no_grad():
            for crop, g in zip(crops[:k], singles):
                x = (torch.from_numpy(crop).to(device).permute(2, 0, 1)[None].float() / 127.5 - 1.0).contiguous()
                _, _, (_, _, idx) = modules[2](modules[1](modules[0](x)))
                taming_same += int((idx.view(-1).cpu().numpy() == g.reshape(-1)).sum())
                taming_total += g.size
    finally:
        torch.set_num_threads(threads)
    del modules

    agreement = None
    if args.agreement:  # on the CPU this only exercises the code (CPU vs CPU)
        cpu_tok = load_tokenizer(vq, device="cpu")
        cpu_grids = np.concatenate([cpu_tok.encode(stack[s:s + bs]) for s in range(0, len(stack), bs)])
        agreement = (float((cpu_grids == grids).mean()), int((cpu_grids == grids).all(axis=(1, 2)).sum()), len(grids))
        vq_text_same = sum(vq_list_text(a) == vq_list_text(b) for a, b in zip(cpu_grids, grids))
        agreement += (vq_text_same,)

    torchrun = torchrun_check(input_path, tmp, vq, args) if args.torchrun else None

    # d) renderer
    t_str, t_fast, px_size = bench_renderer(image_root, records, res, args.renderer_reps)

    # ----------------------------------------------------------------------------- table
    n = args.records
    steady = t_exp - t_start
    on_gpu = device.type == "cuda"

    def verdict(value: float, target: float, what: str = "") -> str:
        return f" (target ≥ {target:g}{what}: {'met' if value >= target else 'NOT met'})"
    rows = [
        ["records (image records, 1 VQ + 1 RGB pair each)", f"{n}"],
        ["tokenizer", tok_desc],
        ["settings", f"{res} px, quarter regions, device {args.device}, workers {args.workers}, "
                     f"batch {args.batch_size}, format {args.format}"],
        ["baseline: end to end (model load excluded)", f"{t_base:.2f} s = **{1000 * t_base / n:.0f} ms/record**"],
        ["expand: whole call", f"{t_exp:.2f} s = **{1000 * t_exp / n:.0f} ms/record**"],
        ["expand: fixed start-up (same call on a 1-record text-only input)", f"{t_start:.2f} s"],
        ["expand: minus start-up", f"{steady:.2f} s = {1000 * steady / n:.0f} ms/record"],
        ["**throughput ratio expand / baseline** (whole call)", f"**{t_base / t_exp:.2f}x**"
         + verdict(t_base / t_exp, 10 if on_gpu else 1.4, "x on a GPU" if on_gpu else "x on the CPU")],
        ["throughput ratio, start-up excluded", f"{t_base / steady:.2f}x"],
        ["pure encoder (eager float32, batches of %d, after a warm-up batch)" % bs,
         f"{t_enc:.2f} s = {1000 * t_enc / len(crops):.0f} ms/region"],
        ["**pipeline efficiency** = encoder / (expand - start-up)", f"**{t_enc / steady:.2f}**"
         + ("" if on_gpu else verdict(t_enc / steady, 0.85, " on the CPU"))],
        [f"renderer: str(tolist()) of a {res // 2}x{res // 2} region (median)",
         f"{1000 * t_str:.1f} ms ({px_size / 1e6:.2f} MB, {px_size / t_str / 1e6:.0f} MB/s)"],
        ["renderer: px_list_text (median)", f"{1000 * t_fast:.2f} ms ({px_size / t_fast / 1e6:.0f} MB/s)"],
        ["**renderer ratio**", f"**{t_str / t_fast:.1f}x**" + verdict(t_str / t_fast, 10, "x")],
        ["RGB text of expand == baseline-style str(list) of the same box", f"{px_equal}/{px_checked}"],
        ["VQ indices in expand's output == tokenizer.encode of the same crops", f"{vq_equal}/{len(crops)}"],
        ["pure encoder, batch 1", f"{1000 * t_enc1:.0f} ms/region ({k} regions)"],
        [f"indices: tokenizer batch 1 == batch {bs} (same {k} crops)", f"{100 * batch_same:.3f}% equal"],
        [f"indices: taming Encoder + VectorQuantizer == tokenizer, batch 1, one thread, contiguous input ({k} crops)",
         f"{100 * taming_same / taming_total:.3f}% equal"],
        ["output size: baseline JSON / expand shards", f"{base_bytes / 1e6:.0f} MB / {out_bytes / 1e6:.0f} MB"],
        ["tokenizer load (in-process) / imports of this script", f"{t_load:.2f} s / {t_import:.2f} s"],
    ]
    if agreement is not None:
        frac, whole, total, text_same = agreement
        rows.append([f"**CPU vs {args.device} indices** (same crops, batches of {bs})",
                     f"**{100 * frac:.4f}% equal**; {whole}/{total} regions identical; VQ text equal {text_same}/{total}"])
    if torchrun is not None:
        t_one, t_two, same, differing = torchrun
        rows.append(["**torchrun --nproc-per-node 2 (CPU) vs one process**, CLI, shards of 4",
                     f"**{'same bytes' if same else 'DIFFERENT bytes'}**"
                     + ("" if same else f" ({len(differing)} files differ: {', '.join(differing[:4])})")
                     + f"; {t_one:.1f} s vs {t_two:.1f} s (launch and imports included)"])
    for key, value in machine_lines(args.device):
        rows.append([key, value])
    rows.append(["load average before / after", f"{load_before} / {load_average()}"])
    print(md_table(["measure", "value"], rows))
    for note in notes:
        print(f"\nNote: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
