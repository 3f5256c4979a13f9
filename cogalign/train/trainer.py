"""`CogalignTrainer`: a `transformers.Trainer` that keeps only what is specific to this data.

- `compute_loss`: token cross-entropy split by answer kind (original / VQ / RGB), summed and divided
  by the supervised tokens of the whole global batch (the Trainer's `num_items_in_batch`, gathered
  across ranks by `average_tokens_across_devices`), so 1 rank and N ranks give the same gradient.
  The loss always touches every trainable parameter (times 0), so a micro-batch without an image,
  or an empty padding micro-batch (which runs the model on one unsupervised token), still
  backpropagates, and DDP still reduces every gradient on every rank.
- `create_optimizer`: one parameter group per Table 7 group, each with its own rate.
- `log`: adds the per-kind losses, supervised tokens and each group's rate, and appends them to
  RUN/train_log.jsonl; `evaluate` reports the held-out loss per kind (RUN/eval_log.jsonl).
- Checkpoints also hold each rank's record counts, so a resume reports the same totals.
Everything else (DDP, DeepSpeed, FSDP, mixed precision, clipping, checkpointing, schedule, resume,
TensorBoard / W&B) is the Trainer's.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer

from cogalign.errors import CogalignError
from cogalign.train.collate import KIND_ID, KINDS, new_stats
from cogalign.train.data import EpochSampler
from cogalign.train.stages import GROUPS, group_params

__all__ = ["CogalignTrainer", "quiet_callbacks", "merge_stats", "gather_objects", "MODEL_INPUTS", "RANK_STATE",
           "TRAIN_LOG", "EVAL_LOG"]

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")
RANK_STATE = "rank{}_cogalign_state.json"
TRAIN_LOG, EVAL_LOG = "train_log.jsonl", "eval_log.jsonl"


def merge_stats(total: dict, part: dict) -> None:
    """Add the collator counters `part` into `total`."""
    for key in ("seen", "truncated_records", "padding"):
        total[key] += part[key]
    total["skipped"].update(part["skipped"])
    total["truncated"].update(part["truncated"])


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def gather_objects(obj) -> list:
    """`obj` from every rank (just `[obj]` outside torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


class CogalignTrainer(Trainer):
    """`transformers.Trainer` with cogalign's loss split by answer kind, one optimizer group per stage group,
    `EpochSampler` ordering, and train_log.jsonl / eval_log.jsonl."""

    def __init__(self, *args, plan, run_dir: Path, lengths=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan, self.run_dir, self.lengths = plan, Path(run_dir), lengths
        self.model_accepts_loss_kwargs = True  # our compute_loss divides by num_items_in_batch itself
        self.loss_is_scaled_for_ga = True
        self.stats, self.skipped_ids = new_stats(), []
        self.sums = torch.zeros(2 * len(KINDS), dtype=torch.float64, device=self.args.device)  # since the last log
        self._anchors = None

    def _run_epoch(self, *args, **kwargs):
        """An epoch, unless the run already reached its last step: the Trainer enters the epoch a finished
        run was resumed in (it stopped mid-epoch at --max-steps) and would train one step past the end."""
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    # ---- data
    def _sampler(self, n: int, batch: int, shuffle: bool, lengths=None):
        multiple = batch * self.args.world_size
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return EpochSampler(n, seed, multiple, lengths, multiple, shuffle=shuffle)

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        return self._sampler(len(ds), self.args.per_device_train_batch_size, True, self.lengths)

    def _get_eval_sampler(self, eval_dataset):
        return self._sampler(len(eval_dataset), self.args.per_device_eval_batch_size, False)

    # ---- loss
    def _anchor(self, model) -> torch.Tensor:
        """0 × one element of every trainable parameter: keeps each of them in the graph."""
        if self._anchors is None:
            self._anchors = [p for p in model.parameters() if p.requires_grad]
        return sum((p.reshape(-1)[:1].sum() for p in self._anchors), torch.zeros((), device=self.args.device)) * 0.0

    def token_losses(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the token losses, [loss sum per kind..., tokens per kind...]) on the device, no sync."""
        part = torch.zeros(2 * len(KINDS), dtype=torch.float64, device=self.args.device)
        if inputs["input_ids"].shape[0] == 0:  # every slot of this micro-batch was padding or skipped:
            # the model still runs on one unsupervised token, since under DDP every forward is a
            # collective (the buffers' broadcast) and a rank that skips it hangs the others
            out = model(input_ids=torch.full((1, 1), self._filler_id(), device=self.args.device))
            return out.logits.sum() * 0.0, part
        out = model(**{k: inputs[k] for k in MODEL_INPUTS if k in inputs})
        labels, kinds = inputs["labels"][:, 1:], inputs["kinds"][:, 1:]
        keep = labels != -100
        logits = out.logits[:, :-1][keep].float()  # only the supervised positions in float32
        loss = F.cross_entropy(logits, labels[keep], reduction="none")
        ids = torch.tensor([KIND_ID[k] for k in KINDS], device=kinds.device)
        onehot = (kinds[keep][:, None] == ids[None, :]).to(torch.float64)
        part = torch.cat([(loss.detach().to(torch.float64)[:, None] * onehot).sum(0), onehot.sum(0)])
        return loss.sum(), part

    def _filler_id(self) -> int:
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        ids = [getattr(tok, name, None) for name in ("pad_token_id", "eos_token_id", "bos_token_id")]
        return next((i for i in ids if i is not None), 0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Token loss over the global batch's supervised tokens (`num_items_in_batch`), summed per answer kind
        for the logs."""
        self._count(inputs)
        loss_sum, part = self.token_losses(model, inputs)
        self.sums += part
        n = num_items_in_batch if num_items_in_batch is not None else float(part[len(KINDS):].sum())
        n = n.clamp(min=1) if torch.is_tensor(n) else max(n, 1.0)  # a step whose records were all skipped
        loss = loss_sum / n
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages: N × local / global tokens
        loss = loss + self._anchor(model)
        return (loss, None) if return_outputs else loss

    def _get_num_items_in_batch(self, batch_samples, device):
        for b in batch_samples:  # an empty micro-batch has labels of shape (0, 1)
            b.setdefault("labels", torch.zeros((0, 1), dtype=torch.long))
        return super()._get_num_items_in_batch(batch_samples, device)

    def _count(self, inputs: dict) -> None:
        if "stats" in inputs:
            merge_stats(self.stats, inputs.pop("stats"))
            self.skipped_ids += inputs.pop("skipped_ids", [])
            inputs.pop("positions", None)

    # ---- optimizer
    def create_optimizer(self, model=None):
        """The Trainer's optimizer with one parameter group per stage group (and the new VQ token rows), each at
        its own rate."""
        if self.optimizer is None:
            params = group_params(self.model, self.plan)
            rates = {**self.plan.lrs, "new_token_rows": self.plan.new_token_lr}
            groups = [{"params": params[g], "lr": rates[g], "name": g,
                       "weight_decay": 0.0 if g == "new_token_rows" else self.args.weight_decay}
                      for g in (*GROUPS, "new_token_rows") if params[g] and rates[g] is not None]
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            kwargs.pop("lr", None)
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def group_lrs(self) -> dict:
        """Current learning rate of each group."""
        found = {g.get("name"): g["lr"] for g in self.optimizer.param_groups} if self.optimizer else {}
        return {g: found.get(g) for g in (*GROUPS, "new_token_rows") if g in found or g in GROUPS}

    # ---- logging
    def _epoch(self) -> int:
        return max(0, math.ceil(round(self.state.epoch or 0, 6)) - 1)

    def _kind_values(self, sums: torch.Tensor) -> tuple[float, dict, dict]:
        n = len(KINDS)
        loss, tok = sums[:n].tolist(), sums[n:].tolist()
        total = sum(loss) / max(sum(tok), 1.0)
        return total, {k: (loss[j] / tok[j] if tok[j] else None) for j, k in enumerate(KINDS)}, \
            {k: int(tok[j]) for j, k in enumerate(KINDS)}

    def log(self, logs: dict, start_time=None) -> None:
        """The Trainer's log with the loss per answer kind, token counts and rates; written to train_log.jsonl /
        eval_log.jsonl; a non-finite loss stops the run."""
        if "loss" in logs:  # a training log: every rank is here (the Trainer gathered tr_loss)
            sums = _all_reduce(self.sums.clone()).cpu()
            self.sums.zero_()
            total, per_kind, tokens = self._kind_values(sums)
            if total is not None and not math.isfinite(total):  # every rank is here: all stop alike
                raise CogalignError(f"step {self.state.global_step}: the training loss is {total} (diverged); no "
                                    "model is saved: lower the rates (--lr GROUP=VALUE) or keep --max-grad-norm above 0")
            lrs = self.group_lrs()
            logs["loss"] = total
            logs.update({f"loss_{k}": v for k, v in per_kind.items() if v is not None})
            logs.update({f"tokens_{k}": v for k, v in tokens.items()})
            logs.update({f"lr_{g}": v for g, v in lrs.items() if v is not None})
            if self.is_world_process_zero():
                line = {"step": self.state.global_step, "epoch": self._epoch(), "loss": total,
                        **{f"loss_{k}": v for k, v in per_kind.items()}, "tokens": tokens, "lr": lrs}
                with open(self.run_dir / TRAIN_LOG, "a") as f:
                    f.write(json.dumps(line) + "\n")
        super().log(logs, start_time)

    # ---- evaluation: the held-out loss per answer kind
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Loss per answer kind over the held-out split (the same token sums as training)."""
        loader = self.get_eval_dataloader(eval_dataset)
        model = self.model_wrapped
        was_training = model.training
        model.eval()
        sums = torch.zeros(2 * len(KINDS), dtype=torch.float64, device=self.args.device)
        with torch.no_grad():
            for batch in loader:
                batch.pop("stats", None), batch.pop("skipped_ids", None), batch.pop("positions", None)
                sums += self.token_losses(model, self._prepare_inputs(batch))[1]
        model.train(was_training)
        total, per_kind, tokens = self._kind_values(_all_reduce(sums).cpu())
        metrics = {f"{metric_key_prefix}_loss": total,
                   **{f"{metric_key_prefix}_loss_{k}": v for k, v in per_kind.items() if v is not None},
                   **{f"{metric_key_prefix}_tokens_{k}": v for k, v in tokens.items()}}
        self.log(dict(metrics))
        if self.is_world_process_zero():
            with open(self.run_dir / EVAL_LOG, "a") as f:
                f.write(json.dumps({"step": self.state.global_step, **metrics}) + "\n")
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ---- checkpoints: this rank's counts travel with the Trainer's state
    def _save_checkpoint(self, model, trial) -> None:
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotated below, not by the Trainer
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        ckpt = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        state = {"stats": {**self.stats, "skipped": dict(self.stats["skipped"]),
                           "truncated": dict(self.stats["truncated"])},
                 "skipped_ids": self.skipped_ids[:1000], "sums": self.sums.tolist()}
        (ckpt / RANK_STATE.format(self.args.process_index)).write_text(json.dumps(state))
        if limit and limit > 0 and self.args.should_save:
            self._rotate_checkpoints(Path(self._get_output_dir(trial)), limit)

    def _rotate_checkpoints(self, out: Path, limit: int) -> None:
        """The Trainer's `save_total_limit` (the newest `limit` checkpoints and the best one stay), except that
        an older checkpoint-N/ holding a file the run did not write (the user's) is kept whole, never deleted."""
        import shutil

        from cogalign.train.runfolder import _written_by_run, checkpoints, read_run_manifest

        tree = set((read_run_manifest(out) or {}).get("tree", []))
        best = self.state.best_model_checkpoint
        for old in checkpoints(out)[:-limit]:
            if best is not None and Path(best).resolve() == old.resolve():
                continue
            if all(_written_by_run(f.relative_to(out).as_posix(), tree) for f in old.rglob("*") if not f.is_dir()):
                shutil.rmtree(old)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The weights of a checkpoint saved by save_pretrained. The Trainer loads its state dict as it
        is stored, but transformers 5 stores LLaVA under the original key names (language_model.model.*)
        and only from_pretrained maps them back; so load through from_pretrained and copy."""
        from transformers import PreTrainedModel

        target = model if model is not None else self.model
        plain = isinstance(target, PreTrainedModel) and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        if not plain or not (Path(resume_from_checkpoint) / "config.json").exists():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = type(target).from_pretrained(resume_from_checkpoint, dtype=target.dtype)
        target.load_state_dict(loaded.state_dict())

    def load_rank_state(self, ckpt: Path) -> None:
        """Restore this rank's counters from checkpoint `ckpt` (on resume)."""
        path = Path(ckpt) / RANK_STATE.format(self.args.process_index)
        state = json.loads(path.read_text())
        self.stats = {**state["stats"], "skipped": Counter(state["stats"]["skipped"]),
                      "truncated": Counter(state["stats"]["truncated"])}
        self.skipped_ids = state["skipped_ids"]
        self.sums = torch.tensor(state["sums"], dtype=torch.float64, device=self.args.device)

    def total_stats(self) -> tuple[dict, list]:
        """Counts and skipped examples of all ranks together."""
        total = new_stats()
        for part in gather_objects(self.stats):
            merge_stats(total, part)
        ids = [x for part in gather_objects(self.skipped_ids) for x in part]
        return total, ids


def quiet_callbacks(trainer, progress: bool) -> None:
    """A progress bar on stderr (or none), and no dict printed per log line: train_log.jsonl has them."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(BarOnly)
