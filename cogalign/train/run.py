"""The training loop: accelerate for DDP (gloo on CPU, nccl on GPUs), bf16 autocast on GPUs and
checkpoints; transformers for the cosine schedule with warm-up and for saving the model.

Each optimizer step takes `global_batch_size` records in the dataset's order: every rank takes its
share of them as `gradient_accumulation_steps` micro-batches. The loss is the sum of token losses
divided by the supervised tokens of the whole global batch, so 1 rank and N ranks at the same
global batch compute the same gradient.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cogalign.errors import CogalignError
from cogalign.train.collate import KIND_ID, KINDS, Collator, Encoder, new_stats
from cogalign.train.data import ShardDataset
from cogalign.train.stages import GROUPS, Plan, group_params

STATE = "trainer_state.json"
RUN_CONFIG = "cogalign_train.json"
CHECKPOINT = "checkpoint-"


@dataclass
class TrainConfig:
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
    save_every: int = 0
    resume: bool = False
    progress: bool = True
    allow_absolute_paths: bool = False
    extra: dict = field(default_factory=dict)


def init_distributed() -> tuple[int, int]:
    """(rank, world) from torchrun's environment; the process group is gloo on CPU, nccl on GPUs."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _sum(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def token_losses(model, batch: dict):
    """Per-token cross-entropy (float32) on the shifted labels, with each token's answer kind."""
    import torch.nn.functional as F

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes") if k in batch}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="none")
    return loss, batch["kinds"][:, 1:].reshape(-1)


def dummy_batch(device) -> dict:
    """A one-token batch with no labels: a rank whose share ran out still takes part in DDP."""
    import torch

    z = torch.zeros((1, 2), dtype=torch.long, device=device)
    return {"input_ids": z, "attention_mask": torch.ones_like(z), "labels": z - 100, "kinds": z}


def merge_stats(total: dict, part: dict) -> None:
    for key in ("seen", "truncated_records", "padding"):
        total[key] += part[key]
    total["skipped"].update(part["skipped"])
    total["truncated"].update(part["truncated"])


def _stats_json(stats: dict) -> dict:
    return {"seen": stats["seen"], "skipped": sum(stats["skipped"].values()),
            "skipped_by_reason": dict(stats["skipped"]), "truncated_records": stats["truncated_records"],
            "truncated_answers": {k: stats["truncated"].get(k, 0) for k in KINDS}}


def _gather_stats(stats: dict, device) -> dict:
    """Add up the counts of all ranks."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return stats
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, stats)
    total = new_stats()
    for p in parts:
        merge_stats(total, p)
    return total


def train(cfg: TrainConfig, model, processor) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from transformers import get_cosine_schedule_with_warmup

    plan = cfg.plan
    rank, world = init_distributed()
    gpu = torch.cuda.is_available()
    # step_scheduler_with_optimizer=False: accelerate would otherwise step the schedule once per rank
    # per optimizer step (it assumes the batch grows with the ranks), so N ranks would run N× faster
    # through warm-up and cosine than 1 rank at the same global batch.
    accel = Accelerator(mixed_precision="bf16" if gpu else "no", cpu=not gpu,  # cpu=True: multi-CPU DDP (gloo)
                        step_scheduler_with_optimizer=False,
                        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if world != plan.world_size or accel.num_processes != world:
        raise CogalignError(f"plan made for {plan.world_size} ranks but accelerate runs {accel.num_processes} of {world}")
    set_seed(cfg.seed)
    out = Path(cfg.out)
    probe = ShardDataset(cfg.data, cfg.seed, 0, rank, world, plan.per_device_batch_size,
                         image_root=cfg.image_root, allow_absolute_paths=cfg.allow_absolute_paths)
    accum, per_device = plan.gradient_accumulation_steps, plan.per_device_batch_size
    per_rank_step = accum * per_device
    steps_per_epoch = max(1, math.ceil(probe.rank_length() / per_rank_step))
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * plan.epochs))

    params = group_params(model, plan)
    groups = [g for g in GROUPS if plan.lrs[g] is not None and params[g]]
    if not groups:
        raise CogalignError("nothing to train: every group is frozen (unfreeze one with --lr GROUP=VALUE)")
    optimizer = torch.optim.AdamW([{"params": params[g], "lr": plan.lrs[g], "weight_decay": plan.weight_decay,
                                    "name": g} for g in groups])
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(plan.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accel.prepare(model, optimizer, scheduler)
    from cogalign.train.model import resize_mode

    encoder = Encoder(processor, cfg.max_length, cfg.vq_tokens, resize_mode(cfg.data))
    collator = Collator(encoder)

    step, stats, skipped_ids = 0, new_stats(), []
    log_path = out / "train_log.jsonl"
    if cfg.resume:
        step, stats, skipped_ids = _load_checkpoint(accel, out, log_path)
    elif accel.is_main_process:  # a fresh run: an earlier run's log and checkpoints in --out go
        out.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
        import shutil

        for old in checkpoints(out):
            shutil.rmtree(old)
    accel.wait_for_everyone()

    from cogalign.progress import Progress

    started = time.perf_counter()
    with Progress(total_steps - step, cfg.progress and accel.is_main_process, label="steps") as bar:
        batches = None
        while step < total_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if batches is None:
                ds = ShardDataset(cfg.data, cfg.seed, epoch, rank, world, per_device, start=in_epoch * per_rank_step,
                                  image_root=probe.image_root, allow_absolute_paths=cfg.allow_absolute_paths)
                loader = torch.utils.data.DataLoader(ds, batch_size=per_device, collate_fn=collator,
                                                     num_workers=cfg.workers)
                batches = iter(loader)
            micro = []
            for _ in range(accum):
                b = next(batches, None)
                if b is not None:
                    merge_stats(stats, b["stats"])
                    skipped_ids += b["skipped_ids"]
                micro.append(b if b is not None and b["input_ids"].shape[0] else None)
            tokens = [sum(int(((b["labels"][:, 1:] != -100) & (b["kinds"][:, 1:] == KIND_ID[k])).sum()) for b in micro if b)
                      for k in KINDS]
            total_tokens = _sum([sum(tokens)], accel.device)[0]
            sums = [0.0] * len(KINDS)
            model.train()
            for i, b in enumerate(micro):
                b = {k: v.to(accel.device) for k, v in (b or dummy_batch(accel.device)).items() if hasattr(v, "to")}
                ctx = accel.no_sync(model) if i < accum - 1 else nullcontext()
                with ctx, accel.autocast():
                    loss, kinds = token_losses(model, b)
                    scaled = loss.sum() * world / max(total_tokens, 1.0)
                    accel.backward(scaled)
                for j, k in enumerate(KINDS):
                    sums[j] += float(loss.detach()[kinds == KIND_ID[k]].sum())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % steps_per_epoch == 0:
                batches = None  # the epoch is over: the next step starts the next epoch's order
            both = _sum(sums + [float(t) for t in tokens], accel.device)
            loss_sums, tok = both[:3], both[3:]
            if accel.is_main_process and (step % cfg.log_every == 0 or step == total_steps):
                line = {"step": step, "epoch": epoch, "loss": sum(loss_sums) / max(sum(tok), 1.0),
                        **{f"loss_{k}": (loss_sums[j] / tok[j] if tok[j] else None) for j, k in enumerate(KINDS)},
                        "tokens": {k: int(tok[j]) for j, k in enumerate(KINDS)},
                        "lr": {g: _group_lr(optimizer, g) for g in GROUPS}}
                with open(log_path, "a") as f:
                    f.write(json.dumps(line) + "\n")
            bar.advance()
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                _save_checkpoint(accel, out, step, stats, skipped_ids)
    stats = _gather_stats(stats, accel.device)
    ids = _gather_list(skipped_ids)
    summary = {"steps": step, "world_size": world, "seconds": round(time.perf_counter() - started, 1),
               **_stats_json(stats), "skipped_examples": ids[:20]}
    if accel.is_main_process:
        _save_checkpoint(accel, out, step, stats, skipped_ids, final=True)
        accel.unwrap_model(model).save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
        (out / RUN_CONFIG).write_text(json.dumps({"vq_tokens": cfg.vq_tokens, "max_length": cfg.max_length,
                                                  "seed": cfg.seed, "data": str(cfg.data)}, indent=2) + "\n")
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    else:
        _save_checkpoint(accel, out, step, stats, skipped_ids, final=True)
    accel.wait_for_everyone()
    return summary


def _group_lr(optimizer, name: str):
    opt = getattr(optimizer, "optimizer", optimizer)
    return next((g["lr"] for g in opt.param_groups if g.get("name") == name), None)


def _gather_list(items: list) -> list:
    import torch.distributed as dist

    if not dist.is_initialized():
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for p in parts for x in p]


def _save_checkpoint(accel, out: Path, step: int, stats: dict, skipped_ids: list, final: bool = False) -> None:
    """RUN/checkpoint-STEP/: model, optimizer, scheduler and RNG states (accelerate) + this rank's
    counts. The two newest are kept."""
    import shutil

    ckpt = out / f"{CHECKPOINT}{step}"
    accel.wait_for_everyone()
    accel.save_state(str(ckpt), safe_serialization=True)
    state = {"step": step, "stats": {**stats, "skipped": dict(stats["skipped"]), "truncated": dict(stats["truncated"])},
             "skipped_ids": skipped_ids[:1000]}
    (ckpt / f"rank{accel.process_index}_{STATE}").write_text(json.dumps(state))
    accel.wait_for_everyone()
    if accel.is_main_process:
        for old in checkpoints(out)[:-2]:
            shutil.rmtree(old, ignore_errors=True)
    accel.wait_for_everyone()


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in a run folder, oldest first."""
    found = [p for p in Path(out).glob(f"{CHECKPOINT}*") if p.name[len(CHECKPOINT):].isdigit()
             and (p / f"rank0_{STATE}").exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT):]))


def _load_checkpoint(accel, out: Path, log_path: Path) -> tuple[int, dict, list]:
    found = checkpoints(out)
    if not found:
        raise CogalignError(f"--resume: no checkpoint in {out} (train without --resume)")
    ckpt = found[-1]
    path = ckpt / f"rank{accel.process_index}_{STATE}"
    if not path.exists():
        raise CogalignError(f"--resume: {ckpt} was saved with another number of ranks (run with the same torchrun size)")
    accel.load_state(str(ckpt))
    state = json.loads(path.read_text())
    stats = state["stats"]
    stats["skipped"], stats["truncated"] = Counter(stats["skipped"]), Counter(stats["truncated"])
    if accel.is_main_process and log_path.exists():  # drop log lines written after the checkpoint
        lines = [l for l in log_path.read_text().splitlines() if l and json.loads(l)["step"] <= state["step"]]
        log_path.write_text("".join(l + "\n" for l in lines))
    return state["step"], stats, state["skipped_ids"]
