"""A `cogalign train` run: the output folder checked, the data split, `CogalignTrainer` built from the
stage plan and the Trainer's arguments, trained (or resumed), and the run folder written:
the model (Auto classes load it; with LoRA the adapter in RUN/adapter/ and, with --merge-lora, the
merged model), the processor, train_log.jsonl, eval_log.jsonl, train_summary.json and checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from cogalign.errors import CogalignError
from cogalign.train.runfolder import (RUN_MANIFEST, checkpoint_step, checkpoints, complete_checkpoints,  # noqa: F401
                                      prepare, record_files)
from cogalign.train.stages import GROUPS, Plan

__all__ = ["TrainConfig", "train", "pinned", "split", "RUN_CONFIG", "CACHE"]

RUN_CONFIG = "cogalign_train.json"
CACHE = "cache"


@dataclass
class TrainConfig:
    """Everything one `cogalign train` run needs besides the model: data and run folders, stage plan, lengths,
    steps, saving, LoRA and Trainer options."""
    data: Path
    out: Path
    plan: Plan
    seed: int = 0
    max_length: int = 2048
    max_steps: Optional[int] = None
    vq_tokens: str = "text"
    image_root: Optional[Path] = None
    workers: int = 0
    log_every: int = 1
    save_every: int = 500
    save_total_limit: Optional[int] = 2
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    allow_absolute_paths: bool = False
    val_size: Optional[float] = None  # N records (>= 1) or a fraction (< 1) held out
    eval_steps: Optional[int] = None
    group_by_modality_length: bool = False
    lora: Optional[dict] = None  # r, alpha, dropout, target
    merge_lora: bool = False
    model_name: str = "tiny"
    options: dict = field(default_factory=dict)  # TrainingArguments fields from our options
    extra: dict = field(default_factory=dict)  # --trainer-config / --trainer-arg


def pinned(cfg: TrainConfig) -> dict:
    """The options that shape the run: a resume must give the same (--max-steps may grow)."""
    from cogalign.expand.layout import read_manifest

    try:
        fingerprint = read_manifest(Path(cfg.data)).get("fingerprint")
    except CogalignError:
        fingerprint = None
    p = cfg.plan
    return {"data": str(Path(cfg.data).resolve()), "data_fingerprint": fingerprint, "model": cfg.model_name,
            "stage": p.stage, "lr": {g: p.lrs[g] for g in GROUPS}, "modules": p.patterns,
            "global_batch_size": p.global_batch_size, "per_device_batch_size": p.per_device_batch_size,
            "world_size": p.world_size, "epochs": p.epochs, "max_length": cfg.max_length, "vq_tokens": cfg.vq_tokens,
            "seed": cfg.seed, "val_size": cfg.val_size, "group_by_modality_length": cfg.group_by_modality_length,
            "lora": cfg.lora}


def split(n: int, val_size: Optional[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) positions: `val_size` records (or that fraction) drawn by the seed."""
    if not val_size:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    k = int(val_size) if val_size >= 1 else int(round(val_size * n))
    if not 0 < k < n:
        raise CogalignError(f"--val-size {val_size:g}: holds out {k} of {n} records; leave at least one on each side")
    held = np.sort(np.random.default_rng([seed, 7919]).permutation(n)[:k])
    return np.setdiff1d(np.arange(n), held), held


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def train(cfg: TrainConfig, model, processor) -> dict:
    """Train `model` on `cfg.data` with the Trainer (or resume), save the model and train_summary.json in
    `cfg.out`, and return the summary."""
    from cogalign.hub.output import check_complete
    from cogalign.train.args import build_training_args, training_kwargs
    from cogalign.train.collate import Collator, Encoder
    from cogalign.train.data import ShardDataset, modality_lengths
    from cogalign.train.stages import group_params
    from cogalign.train.trainer import EVAL_LOG, TRAIN_LOG, CogalignTrainer, quiet_callbacks

    out, plan = Path(cfg.out), cfg.plan
    check_complete(cfg.data)
    if _rank() == 0:
        prepare(out, pinned(cfg), cfg.resume, cfg.overwrite, cfg.max_steps)
    before = {p.name for p in out.iterdir()} if out.is_dir() else set()
    options = {"logging_steps": cfg.log_every, "save_steps": cfg.save_every, "save_total_limit": cfg.save_total_limit,
               "dataloader_num_workers": cfg.workers, "eval_steps": cfg.eval_steps, **cfg.options}
    kwargs = training_kwargs(out=out, plan=plan, seed=cfg.seed, max_steps=cfg.max_steps, epochs=plan.epochs,
                             options=options, extra=cfg.extra, has_eval=bool(cfg.val_size))
    args = build_training_args(kwargs)
    if args.world_size != plan.world_size:
        raise CogalignError(f"plan made for {plan.world_size} ranks but the Trainer runs {args.world_size}")
    try:  # the shards' Arrow copy is deleted also when the run fails (bad --val-size, ...)
        with args.main_process_first(desc="the Arrow copy of the shards"):
            full = ShardDataset(cfg.data, cfg.image_root, allow_absolute_paths=cfg.allow_absolute_paths, cache=out / CACHE)
        train_idx, val_idx = split(full.num_records, cfg.val_size, cfg.seed)
        make = lambda idx: ShardDataset(cfg.data, full.image_root, allow_absolute_paths=cfg.allow_absolute_paths,  # noqa: E731
                                        indices=idx, cache=out / CACHE)
        train_ds, val_ds = make(train_idx), (make(val_idx) if len(val_idx) else None)
        lengths = modality_lengths(train_ds) if cfg.group_by_modality_length else None

        if cfg.lora:
            from cogalign.train.lora import add_lora

            model = add_lora(model, plan, **cfg.lora)
        group_params(model, plan)  # requires_grad from the plan before the Trainer wraps the model
        if getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still get gradients
        from cogalign.train.model import resize_mode

        # the Encoder fits the image processor to expand's --resize (no centre crop) before it is saved
        encoder = Encoder(processor, cfg.max_length, cfg.vq_tokens, resize_mode(cfg.data))
        trainer = CogalignTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                                  data_collator=Collator(encoder),
                                  processing_class=processor, plan=plan, run_dir=out, lengths=lengths)
        quiet_callbacks(trainer, cfg.progress)
        if not cfg.progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        resume_from = None
        if cfg.resume:
            done = complete_checkpoints(out)
            if not done:
                raise CogalignError(f"--resume: no complete checkpoint-N folder in {out} (start anew with --overwrite)")
            resume_from = done[-1]
            if not (resume_from / f"rank{args.process_index}_cogalign_state.json").exists():
                raise CogalignError(f"--resume: {resume_from} was saved with another number of ranks "
                                    "(run with the same torchrun size)")
            trainer.load_rank_state(resume_from)
            step = checkpoint_step(resume_from)
            if args.process_index == 0:
                for name in (TRAIN_LOG, EVAL_LOG):  # drop log lines written after the checkpoint
                    _truncate_log(out / name, step)
        elif args.process_index == 0:
            for name in (TRAIN_LOG, EVAL_LOG) if val_ds is not None else (TRAIN_LOG,):
                (out / name).write_text("")
        seen_before = trainer.total_stats()[0]["seen"]  # a resumed run's counts so far (the rate is this session's)
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        stats, ids = trainer.total_stats()
        summary = _summary(trainer, stats, ids, round(time.perf_counter() - started, 3))
        summary.update(records=full.num_records, held_out=len(val_idx),  # every record of --data accounted for
                       records_per_second=round((stats["seen"] - seen_before) / max(summary["seconds"], 1e-9), 2))
        if stats["seen"] == 0:
            if args.process_index == 0 and not cfg.resume:
                _drop_new_run_files(out, before)  # so the same command, inputs fixed, runs again
            reasons = ", ".join(f"{k}: {v}" for k, v in stats["skipped"].items()) or "no records"
            raise CogalignError(f"every record was skipped ({reasons}; first: {ids[0] if ids else '-'}): "
                                "nothing was learned and no model is saved; fix the inputs (e.g. --image-root)")
        _save(trainer, cfg, processor, out, summary)
    finally:  # the shards' uncompressed copy goes also when the run fails
        if args.process_index == 0:
            shutil.rmtree(out / CACHE, ignore_errors=True)
    if args.process_index == 0:
        record_files(out, before)
    return summary


def _drop_new_run_files(out: Path, before: set) -> None:
    """Delete what a run that learned nothing wrote since it started (its checkpoint-N/ of an untrained model,
    its logs); the folder is then a new run's again."""
    from cogalign.train.runfolder import RUN_FILES

    made = set(checkpoints(out))
    for p in out.iterdir():
        if p.name in before or not (p.name in RUN_FILES or p in made):
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _truncate_log(path: Path, step: int) -> None:
    if path.exists():
        lines = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= step]
        path.write_text("".join(l + "\n" for l in lines))


def _summary(trainer, stats: dict, ids: list, seconds: float) -> dict:
    from cogalign.train.collate import KINDS

    return {"steps": trainer.state.global_step, "world_size": trainer.args.world_size, "seconds": seconds,
            "seen": stats["seen"], "skipped": sum(stats["skipped"].values()),
            "skipped_by_reason": dict(stats["skipped"]), "truncated_records": stats["truncated_records"],
            "truncated_answers": {k: stats["truncated"].get(k, 0) for k in KINDS}, "padding": stats["padding"],
            "skipped_examples": ids[:20]}


def _save(trainer, cfg: TrainConfig, processor, out: Path, summary: dict) -> None:
    """The model the Auto classes load (with LoRA: the adapter, and the merged model on --merge-lora)."""
    if cfg.lora:
        trainer.save_model(str(out / "adapter"))
        if cfg.merge_lora and trainer.is_world_process_zero():
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(out, safe_serialization=True)
            processor.save_pretrained(out)
    else:
        trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        (out / RUN_CONFIG).write_text(json.dumps({"vq_tokens": cfg.vq_tokens, "max_length": cfg.max_length,
                                                  "seed": cfg.seed, "data": str(cfg.data)}, indent=2) + "\n")
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
