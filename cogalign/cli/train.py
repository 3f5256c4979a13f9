"""`cogalign train`, `cogalign generate`, `cogalign eval`: thin typer commands over cogalign.train."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from cogalign.cli.util import fail, say
from cogalign.errors import CogalignError

TRAIN_HELP = """Train a LLaVA-family model on `cogalign expand` output (Table 7 stages) with transformers' Trainer.

MODEL is a Hugging Face LLaVA / LLaVA-NeXT checkpoint (Hub id or local folder), or `tiny` /
`tiny-next`: a small random LLaVA-1.5 / LLaVA-NeXT with a BPE tokenizer trained on the shards, for
CPU smoke runs and tests. Table 7's rates are
fine-tuning rates for pretrained weights: `tiny` trains from scratch and needs higher ones, e.g.
`--lr projector=3e-3 --lr vision_tower=3e-3 --lr language_model=3e-3`.
DDP: `torchrun --nproc-per-node N -m cogalign train ...` (gloo on CPU, nccl on GPUs); DeepSpeed
and FSDP through --deepspeed / --fsdp. Any other TrainingArguments field: --trainer-arg KEY=VALUE
or --trainer-config FILE (they win over the options). --resume refuses changed options, except a
larger --max-steps (the schedule is then recomputed for the new length)."""


def _positive(name: str, value, allow_none: bool = True, integer: bool = True) -> None:
    import math

    if value is None and allow_none:
        return
    ok = value is not None and math.isfinite(value) and value > 0 and (not integer or float(value).is_integer())
    if not ok:
        raise CogalignError(f"{name} {value}: give a {'whole ' if integer else ''}number above 0")


def train_cmd(
    model: str = typer.Option(..., "--model", help="LLaVA / LLaVA-NeXT checkpoint (Hub id or folder), `tiny` or `tiny-next`."),
    data: Path = typer.Option(..., "--data", help="Output folder of `cogalign expand` (its data/ shards); it must be complete."),
    out: Path = typer.Option(Path("run"), "--out", help="Run folder: a new or empty folder, or an earlier run (with --resume or --overwrite). Holds the model (safetensors), processor, train_log.jsonl, eval_log.jsonl, train_summary.json, checkpoint-N/, cogalign_run.json."),
    stage: int = typer.Option(3, "--stage", help="Table 7 preset: 1 projector 1e-3, batch 256; 2 + vision 2e-6, batch 64; 3 projector 1e-5, vision 2e-6, LM 1e-5, batch 32."),
    lr: Optional[List[str]] = typer.Option(None, "--lr", help="GROUP=VALUE (projector, vision_tower, language_model); a rate unfreezes the group, `frozen` freezes it. Repeatable. Default: the stage's."),
    modules: Optional[List[str]] = typer.Option(None, "--modules", help="GROUP=REGEX: which parameter names form a group (other architectures); a pattern matching nothing is an error. Default: multi_modal_projector|image_newline, vision_tower, language_model|lm_head."),
    global_batch_size: Optional[int] = typer.Option(None, "--global-batch-size", help="Records per optimizer step, over all ranks. Default: the stage's (256, 64, 32)."),
    per_device_batch_size: Optional[int] = typer.Option(None, "--per-device-batch-size", help="Records per forward pass on one rank. Default: min(8, global batch / ranks)."),
    epochs: float = typer.Option(1.0, "--epochs", help="Epochs, above 0 (Table 7: 1)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps (the schedule spans them). Default: the epochs'."),
    max_length: int = typer.Option(2048, "--max-length", help="Tokens per record; longer records are cut and the cut answers counted per kind (original, VQ, RGB)."),
    vq_tokens: str = typer.Option("text", "--vq-tokens", help="text: VQ indices as digits; special: one new token <vq_N> per index (embeddings resized; the new rows train in every stage)."),
    vq_codebook_size: Optional[int] = typer.Option(None, "--vq-codebook-size", help="K for --vq-tokens special. Default: from cogalign.json's tokenizer name (demo-f8-4096 → 4096)."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder that `image` paths are relative to. Default: the folder of the input expand read (cogalign.json)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order (all records shuffled per epoch), the held-out split, the tiny model and the Trainer."),
    group_by_modality_length: bool = typer.Option(False, "--group-by-modality-length", help="LLaVA's sampler: each batch of ranks × per-device records holds one modality (image or text-only), longest first. Default: off (a plain global shuffle)."),
    val_size: Optional[float] = typer.Option(None, "--val-size", help="Hold out N records (N >= 1) or this fraction (< 1) of the output, drawn by --seed; their loss per answer kind is reported every --eval-steps. Default: none."),
    eval_steps: Optional[int] = typer.Option(None, "--eval-steps", help="Evaluate the held-out split every N steps (needs --val-size). Default: --save-steps."),
    logging_steps: int = typer.Option(1, "--logging-steps", help="Write train_log.jsonl (and report) every N steps."),
    save_steps: int = typer.Option(500, "--save-steps", "--save-every", help="Save RUN/checkpoint-N/ every N steps (and at the end)."),
    save_total_limit: Optional[int] = typer.Option(2, "--save-total-limit", help="Keep this many newest checkpoints (0: keep all)."),
    workers: int = typer.Option(0, "--dataloader-num-workers", "--workers", help="DataLoader worker processes per rank (0: load in the training process)."),
    deepspeed: Optional[Path] = typer.Option(None, "--deepspeed", help="DeepSpeed config JSON (e.g. ZeRO-2), passed to the Trainer. Default: none."),
    fsdp: Optional[str] = typer.Option(None, "--fsdp", help="FSDP options as the Trainer takes them, e.g. 'full_shard auto_wrap'. Default: none."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute activations in the backward pass (less memory). Default: off."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Clip the gradient norm (0: no clipping)."),
    bf16: bool = typer.Option(False, "--bf16", help="bf16 mixed precision. Default: off."),
    fp16: bool = typer.Option(False, "--fp16", help="fp16 mixed precision. Default: off."),
    tf32: Optional[bool] = typer.Option(None, "--tf32/--no-tf32", help="TF32 matmuls on Ampere+ GPUs. Default: the Trainer's (unset)."),
    report_to: str = typer.Option("none", "--report-to", help="none, tensorboard (RUN/runs/) or wandb; a comma list for several."),
    torch_dtype: str = typer.Option("auto", "--torch-dtype", help="Weights' dtype: auto (as stored), float32, bfloat16, float16."),
    attn_implementation: Optional[str] = typer.Option(None, "--attn-implementation", help="eager, sdpa, flash_attention_2, ... Default: the model's."),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", help="LoRA rank: adapters on the LM's linear layers (peft), the projector trained in full. Default: off (full fine-tuning)."),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha", help="LoRA alpha."),
    lora_dropout: float = typer.Option(0.05, "--lora-dropout", help="LoRA dropout."),
    lora_target: Optional[str] = typer.Option(None, "--lora-target", help="Comma list of the LM's linear layer names (e.g. q_proj,v_proj). Default: all of them."),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="With --lora-r: also write the merged model to RUN (Auto classes load it); the adapter stays in RUN/adapter/. Default: off."),
    trainer_arg: Optional[List[str]] = typer.Option(None, "--trainer-arg", help="KEY=VALUE for any TrainingArguments field (VALUE read as YAML). Repeatable; wins over the options. Default: none."),
    trainer_config: Optional[Path] = typer.Option(None, "--trainer-config", help="YAML or JSON file of TrainingArguments fields (--trainer-arg wins over it). Default: none."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint-N/: same data order, same loss curve. Changed options are refused (a larger --max-steps is allowed). Default: off."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in --out (deletes only that run's files). Default: off."),
    print_sample: Optional[int] = typer.Option(None, "--print-sample", help="Print record N of --data (shard order, not shuffled) as training renders it, as one JSON object {id, input_text, supervised, image_tokens}, and exit without training. Default: off."),
    print_plan: bool = typer.Option(False, "--print-plan", help="Print the plan (groups, rates, batch) as JSON and exit without training. Default: off."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar. Default: off."),
) -> None:
    from cogalign.hub.output import check_complete
    from cogalign.train.args import checkpointing_field, parse_trainer_args
    from cogalign.train.runfolder import check as check_out
    from cogalign.train.model import add_vq_tokens, codebook_size, load
    from cogalign.train.run import TrainConfig, train
    from cogalign.train.stages import make_plan, plan_json
    from cogalign.expand.distributed import leave

    try:
        for name, value in (("--global-batch-size", global_batch_size), ("--per-device-batch-size", per_device_batch_size),
                            ("--max-steps", max_steps), ("--max-length", max_length), ("--logging-steps", logging_steps),
                            ("--save-steps", save_steps), ("--eval-steps", eval_steps), ("--lora-r", lora_r),
                            ("--vq-codebook-size", vq_codebook_size)):
            _positive(name, value)
        _positive("--epochs", epochs, integer=False)
        _positive("--val-size", val_size, integer=val_size is not None and val_size >= 1)
        _positive("--lora-alpha", lora_alpha, integer=False)
        for name, value, ok, want in (
                ("--dataloader-num-workers", workers, workers >= 0, "0 or more"),
                ("--save-total-limit", save_total_limit, save_total_limit is None or save_total_limit >= 0, "0 or more"),
                ("--seed", seed, 0 <= seed < 2 ** 32, "a whole number from 0 to 2**32-1"),
                ("--lora-dropout", lora_dropout, 0 <= lora_dropout < 1, "a number from 0 to below 1"),
                ("--max-grad-norm", max_grad_norm, max_grad_norm >= 0, "0 (no clipping) or more")):
            if not ok:  # nan fails every comparison
                raise CogalignError(f"{name} {value}: give {want}")
        if vq_tokens not in ("text", "special"):
            raise CogalignError(f"--vq-tokens {vq_tokens!r}: choose text or special")
        if torch_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise CogalignError(f"--torch-dtype {torch_dtype!r}: choose auto, float32, bfloat16 or float16")
        if eval_steps and not val_size:
            raise CogalignError("--eval-steps needs a held-out split: give --val-size N or a fraction")
        if merge_lora and not lora_r:
            raise CogalignError("--merge-lora merges a LoRA adapter: give --lora-r too")
        if deepspeed is not None and not deepspeed.is_file():
            raise CogalignError(f"--deepspeed {deepspeed}: no such file (a DeepSpeed config JSON)")
        for target in report_to.split(","):
            needs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(target.strip(), ())
            if needs and not any(importlib.util.find_spec(m) for m in needs):
                raise CogalignError(f"--report-to {target.strip()}: `pip install {needs[0]}` first (or --report-to none)")
        extra = parse_trainer_args(trainer_arg, trainer_config)
        check_complete(data)
        if not print_plan and print_sample is None:
            check_out(out, resume, overwrite)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        plan = make_plan(stage, world, lr, global_batch_size, per_device_batch_size, epochs, modules)
        net, processor = load(model, data, seed)
        if torch_dtype != "auto":
            import torch

            net = net.to(getattr(torch, torch_dtype))
        if attn_implementation:
            try:
                net.set_attn_implementation(attn_implementation)
            except (ValueError, ImportError) as e:
                raise CogalignError(f"--attn-implementation {attn_implementation}: {str(e).splitlines()[0]}") from None
        if vq_tokens == "special":
            k = vq_codebook_size or codebook_size(data)
            if not k:
                raise CogalignError("--vq-tokens special: pass --vq-codebook-size (not found in cogalign.json)")
            add_vq_tokens(net, processor, k)
            plan.new_token_start = processor.tokenizer.convert_tokens_to_ids("<vq_0>")
        if print_plan:
            typer.echo(json.dumps(plan_json(plan, net)))
            return
        if print_sample is not None:
            from cogalign.train.sample import render_sample

            typer.echo(json.dumps(render_sample(data, print_sample, processor, max_length, vq_tokens, image_root)))
            return
        options = {"max_grad_norm": max_grad_norm, "bf16": bf16 or None, "fp16": fp16 or None, "tf32": tf32,
                   "report_to": [r.strip() for r in report_to.split(",")], checkpointing_field(): gradient_checkpointing or None,
                   "deepspeed": str(deepspeed) if deepspeed else None, "fsdp": fsdp, "disable_tqdm": no_progress}
        lora = {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "target": lora_target} if lora_r else None
        cfg = TrainConfig(data, out, plan, seed, max_length, max_steps, vq_tokens, image_root, workers,
                          log_every=logging_steps, save_every=save_steps,
                          save_total_limit=save_total_limit or None, resume=resume, overwrite=overwrite,
                          progress=not no_progress, val_size=val_size, eval_steps=eval_steps or save_steps,
                          group_by_modality_length=group_by_modality_length, lora=lora, merge_lora=merge_lora,
                          model_name=model, options=options, extra=extra)
        summary = train(cfg, net, processor)
        leave()
    except CogalignError as e:
        fail(e)
    if int(os.environ.get("RANK", "0")) == 0:
        say(f"steps: {summary['steps']}  ranks: {summary['world_size']}  time: {summary['seconds']:.1f} s  "
            f"throughput: {summary['records_per_second']} records/s")
        reasons = ", ".join(f"{k} {v}" for k, v in summary["skipped_by_reason"].items())
        held = f", {summary['held_out']} held out for --eval-steps" if summary["held_out"] else ""
        say(f"records seen: {summary['seen']}  skipped: {summary['skipped']}{f' ({reasons})' if reasons else ''}  "
            f"(--data: {summary['records']} records{held})")
        t = summary["truncated_answers"]
        say(f"truncated at --max-length {max_length}: {summary['truncated_records']} records "
            f"(answers cut: original {t['original']}, VQ {t['vq']}, RGB {t['px']})")
        say(f"output: {out}")


def generate_cmd(
    model: Path = typer.Option(..., "--model", help="A `cogalign train` output folder (or a LLaVA checkpoint folder)."),
    data: Path = typer.Option(..., "--data", help="Output folder of `cogalign expand` whose inserted turns are answered."),
    out: Path = typer.Option(Path("predictions.jsonl"), "--out", help="Predictions, one JSON line {id, index, turn, kind, text, finished, turns_dropped} per inserted turn; an existing file is refused unless --overwrite."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Answer the first N records only (N >= 0). Default: all."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder that `image` paths are relative to. Default: from cogalign.json."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest answer generated, in tokens (>= 1); a longer one is cut and written with finished=false."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Longest prompt, in tokens (>= 1): a longer one loses whole earlier turns, oldest first, keeping the image and the question; each cut is counted. Default: the run's training --max-length (cogalign_train.json), else 2048."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts decoded together (>= 1; left padding, greedy; in float32 the answers equal one-at-a-time ones)."),
    device: Optional[str] = typer.Option(None, "--device", help="torch device, e.g. cpu, cuda, cuda:1. Default: cuda when available, else cpu."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file (a text file; never an image, a file of --data or its input). Default: off (refused)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar. Default: off."),
) -> None:
    """Greedy-decode the answer to every inserted VQ/RGB turn, given the image and the conversation before it."""
    from cogalign.train.generate import check_out, run_generate

    try:
        for name, value, least in (("--limit", limit, 0), ("--max-new-tokens", max_new_tokens, 1),
                                   ("--max-length", max_length, 1), ("--batch-size", batch_size, 1)):
            if value is not None and value < least:
                raise CogalignError(f"{name} {value}: must be {least} or more")
        check_out(out, overwrite, data)
        device = _torch_device(device)
        counts = run_generate(model, data, out, limit, image_root, max_new_tokens, not no_progress,
                              batch_size, max_length, overwrite, device)
    except CogalignError as e:
        fail(e)
    rate = counts["answers"] / counts["seconds"] if counts["seconds"] else 0.0
    say(f"records: {counts['records']}  answers: {counts['answers']} ({counts['unfinished']} cut at "
        f"--max-new-tokens {max_new_tokens})  skipped records (image unreadable): {counts['skipped']}")
    unanswered = counts["unanswered"]
    say(f"prompts over --max-length {counts['max_length']}: {counts['shortened']} shortened "
        f"({counts['turns_dropped']} earlier turns dropped), {unanswered.get('too_long', 0)} not answered "
        "(too long with only the question)")
    if set(unanswered) - {"too_long"}:
        say(f"prompts not answered: {unanswered}")
    say(f"time: {counts['seconds']} s  ({rate:.2f} answers/s, batch size {batch_size})")
    say(f"output: {out}")


def _torch_device(name: Optional[str]) -> str:
    """--device checked before any work: a torch device name this machine has."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except (RuntimeError, ValueError):
        raise CogalignError(f"--device {name!r}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CogalignError(f"--device {name}: no CUDA GPU here; use --device cpu")
    return name


def eval_cmd(
    data: Path = typer.Option(..., "--data", help="Output folder of `cogalign expand` with the true answers."),
    predictions: Path = typer.Option(..., "--predictions", help="JSON lines {id, index, turn, kind, text}, e.g. from `cogalign generate` (without index: the record with that id; without turn: the id's turns of that kind in order)."),
    allow_duplicates: Optional[str] = typer.Option(None, "--allow-duplicates", help="first|last: which prediction counts when a turn has several (file order). Default: refuse such a file."),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON instead of a table (psnr: a number, \"inf\" when perfect, null when n is 0). Default: off."),
) -> None:
    """Score predicted VQ/RGB answers: format validity, VQ index accuracy and length error, RGB exact match, MAE, PSNR; missing and duplicate predictions counted apart."""
    from cogalign.train.evaluate import DUPLICATE_CHOICES, score, table

    try:
        if allow_duplicates is not None and allow_duplicates not in DUPLICATE_CHOICES:
            raise CogalignError(f"--allow-duplicates {allow_duplicates!r}: choose first or last")
        if predictions.is_dir():
            raise CogalignError(f"--predictions {predictions} is a folder: give the JSON-lines file `cogalign generate --out` wrote")
        if not predictions.is_file():
            raise CogalignError(f"{predictions}: no such file (write it with `cogalign generate`)")
        result = score(data, predictions, allow_duplicates)
    except CogalignError as e:
        fail(e)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        for line in table(result):
            typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command("train", help=TRAIN_HELP)(train_cmd)
    app.command("generate")(generate_cmd)
    app.command("eval")(eval_cmd)
