"""`cogalign train`, `cogalign generate`, `cogalign eval`: thin typer commands over cogalign.train."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from cogalign.cli.util import fail, say
from cogalign.errors import CogalignError

TRAIN_HELP = """Train a LLaVA-family model on `cogalign expand` output (Table 7 stages).

MODEL is a Hugging Face LLaVA checkpoint (Hub id or local folder) or `tiny`: a small random LLaVA
with a BPE tokenizer trained on the shards, for CPU smoke runs and tests. Table 7's rates are
fine-tuning rates for pretrained weights: `tiny` trains from scratch and needs higher ones, e.g.
`--lr projector=3e-3 --lr vision_tower=3e-3 --lr language_model=3e-3`.
DDP: `torchrun --nproc-per-node N -m cogalign train ...` (gloo on CPU, nccl on GPUs)."""


def train_cmd(
    model: str = typer.Option(..., "--model", help="LLaVA checkpoint (Hub id or folder) or `tiny`."),
    data: Path = typer.Option(..., "--data", help="Output folder of `cogalign expand` (its data/ shards)."),
    out: Path = typer.Option(Path("run"), "--out", help="Run folder: model (safetensors), processor, train_log.jsonl, train_summary.json, checkpoint-N/ (the 2 newest)."),
    stage: int = typer.Option(3, "--stage", help="Table 7 preset: 1 projector 1e-3, batch 256; 2 + vision 2e-6, batch 64; 3 projector 1e-5, vision 2e-6, LM 1e-5, batch 32."),
    lr: Optional[List[str]] = typer.Option(None, "--lr", help="GROUP=VALUE (projector, vision_tower, language_model); a rate unfreezes the group, `frozen` freezes it. Repeatable. Default: the stage's."),
    modules: Optional[List[str]] = typer.Option(None, "--modules", help="GROUP=REGEX: which parameter names form a group (other architectures). Default: multi_modal_projector, vision_tower, language_model|lm_head."),
    global_batch_size: Optional[int] = typer.Option(None, "--global-batch-size", min=1, help="Records per optimizer step, over all ranks. Default: the stage's (256, 64, 32)."),
    per_device_batch_size: Optional[int] = typer.Option(None, "--per-device-batch-size", min=1, help="Records per forward pass on one rank. Default: min(8, global batch / ranks)."),
    epochs: float = typer.Option(1.0, "--epochs", min=0.0, help="Epochs (Table 7: 1)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps (the schedule spans them). Default: the epochs'."),
    max_length: int = typer.Option(2048, "--max-length", min=8, help="Tokens per record; longer records are cut and the cut answers counted per kind (original, VQ, RGB)."),
    vq_tokens: str = typer.Option("text", "--vq-tokens", help="text: VQ indices as digits; special: one new token <vq_N> per index (embeddings resized)."),
    vq_codebook_size: Optional[int] = typer.Option(None, "--vq-codebook-size", min=1, help="K for --vq-tokens special. Default: from cogalign.json's tokenizer name (demo-f8-4096 → 4096)."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder that `image` paths are relative to. Default: the folder of the input expand read (cogalign.json)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order (shuffled per epoch), the tiny model and the tokenizer."),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader worker processes per rank (0: load in the training process)."),
    save_every: int = typer.Option(0, "--save-every", min=0, help="Also save RUN/checkpoint-N/ every N steps (always saved at the end). Default: 0 (only at the end)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint-N/: same data order, same loss curve. Give the same options. Default: off."),
    print_plan: bool = typer.Option(False, "--print-plan", help="Print the plan (groups, rates, batch) as JSON and exit without training. Default: off."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar. Default: off."),
) -> None:
    from cogalign.train.model import add_vq_tokens, codebook_size, load
    from cogalign.train.run import TrainConfig, checkpoints, train
    from cogalign.train.stages import make_plan, plan_json

    try:
        if vq_tokens not in ("text", "special"):
            raise CogalignError(f"--vq-tokens {vq_tokens!r}: choose text or special")
        if resume and not checkpoints(out):
            raise CogalignError(f"--resume: no checkpoint-N folder in {out} (start without --resume)")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        plan = make_plan(stage, world, lr, global_batch_size, per_device_batch_size, epochs, modules)
        net, processor = load(model, data, seed)
        if vq_tokens == "special":
            k = vq_codebook_size or codebook_size(data)
            if not k:
                raise CogalignError("--vq-tokens special: pass --vq-codebook-size (not found in cogalign.json)")
            add_vq_tokens(net, processor, k)
        if print_plan:
            typer.echo(json.dumps(plan_json(plan, net)))
            return
        cfg = TrainConfig(data, out, plan, seed, max_length, max_steps, vq_tokens, image_root, workers,
                          save_every=save_every, resume=resume, progress=not no_progress)
        summary = train(cfg, net, processor)
    except CogalignError as e:
        fail(str(e))
    if int(os.environ.get("RANK", "0")) == 0:
        say(f"steps: {summary['steps']}  ranks: {summary['world_size']}  time: {summary['seconds']} s")
        say(f"records seen: {summary['seen']}  skipped: {summary['skipped']} {summary['skipped_by_reason'] or ''}")
        t = summary["truncated_answers"]
        say(f"truncated at --max-length {max_length}: {summary['truncated_records']} records "
            f"(answers cut: original {t['original']}, VQ {t['vq']}, RGB {t['px']})")
        say(f"output: {out}")


def generate_cmd(
    model: Path = typer.Option(..., "--model", help="A `cogalign train` output folder (or a LLaVA checkpoint folder)."),
    data: Path = typer.Option(..., "--data", help="Output folder of `cogalign expand` whose inserted turns are answered."),
    out: Path = typer.Option(Path("predictions.jsonl"), "--out", help="Predictions, one JSON line {id, kind, text} per inserted turn."),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="Answer the first N records only. Default: all."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder that `image` paths are relative to. Default: from cogalign.json."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Longest answer generated."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar. Default: off."),
) -> None:
    """Greedy-decode the answer to every inserted VQ/RGB turn, given the image and the conversation before it."""
    from cogalign.train.generate import run_generate

    try:
        counts = run_generate(model, data, out, limit, image_root, max_new_tokens, not no_progress)
    except CogalignError as e:
        fail(str(e))
    say(f"records: {counts['records']}  answers: {counts['answers']}  skipped (image unreadable): {counts['skipped']}")
    say(f"output: {out}")


def eval_cmd(
    data: Path = typer.Option(..., "--data", help="Output folder of `cogalign expand` with the true answers."),
    predictions: Path = typer.Option(..., "--predictions", help="JSON lines {id, kind, text}, e.g. from `cogalign generate`."),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON instead of a table. Default: off."),
) -> None:
    """Score predicted VQ/RGB answers: format validity, VQ index accuracy and length error, RGB exact match, MAE, PSNR."""
    from cogalign.train.evaluate import score, table

    try:
        if not predictions.is_file():
            raise CogalignError(f"{predictions}: no such file (write it with `cogalign generate`)")
        result = score(data, predictions)
    except CogalignError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(result))
    else:
        for line in table(result):
            typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command("train", help=TRAIN_HELP)(train_cmd)
    app.command("generate")(generate_cmd)
    app.command("eval")(eval_cmd)
