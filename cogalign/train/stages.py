"""Table 7 stage presets, mapped onto LLaVA's modules, and the plan `--print-plan` shows.

The paper's perceiver, Epigone and denoising transformer are LLaVA's projector; its vision encoder
is the vision tower; its LLM is the language model with `lm_head`. One epoch, cosine schedule.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

from cogalign.errors import CogalignError

__all__ = ["Plan", "make_plan", "group_params", "new_token_params", "parse_assignments", "plan_json", "GROUPS",
           "DEFAULT_PATTERNS", "STAGES", "WARMUP_RATIO", "WEIGHT_DECAY"]

GROUPS = ("projector", "vision_tower", "language_model")
# Parameter-name patterns (re.search) for transformers' LlavaForConditionalGeneration.
DEFAULT_PATTERNS = {
    "projector": r"(^|\.)multi_modal_projector\.|(^|\.)image_newline$",
    "vision_tower": r"(^|\.)vision_tower\.",
    "language_model": r"(^|\.)language_model\.|(^|\.)lm_head\.",
}
# stage: (learning rate per group, None = frozen; global batch)
STAGES = {
    1: ({"projector": 1e-3, "vision_tower": None, "language_model": None}, 256),
    2: ({"projector": 1e-3, "vision_tower": 2e-6, "language_model": None}, 64),
    3: ({"projector": 1e-5, "vision_tower": 2e-6, "language_model": 1e-5}, 32),
}
WARMUP_RATIO = 0.03
WEIGHT_DECAY = 0.0


@dataclass
class Plan:
    """A training stage: learning rate per group (None: frozen), batch sizes and ranks, epochs, warm-up, weight
    decay, group patterns, the new VQ token rows, LoRA."""
    stage: int
    lrs: dict
    global_batch_size: int
    per_device_batch_size: int
    world_size: int = 1
    epochs: float = 1.0
    warmup_ratio: float = WARMUP_RATIO
    weight_decay: float = WEIGHT_DECAY
    patterns: dict = field(default_factory=lambda: dict(DEFAULT_PATTERNS))
    custom: tuple = ()  # groups whose pattern the user gave (--modules): an empty match is an error
    new_token_start: Optional[int] = None  # first row of --vq-tokens special's new embedding rows
    lora: bool = False  # the LM and projector parameters peft marked trainable are the ones trained

    @property
    def new_token_lr(self) -> Optional[float]:
        """New token rows train in every stage: with the LM when it trains, else at the projector's rate."""
        if self.new_token_start is None:
            return None
        return self.lrs["language_model"] or self.lrs["projector"] or self.lrs["vision_tower"]

    @property
    def gradient_accumulation_steps(self) -> int:
        """Global batch ÷ (per-device batch × ranks); a global batch that is not a multiple raises `CogalignError`."""
        per_step = self.per_device_batch_size * self.world_size
        if self.global_batch_size % per_step:
            raise CogalignError(
                f"--global-batch-size {self.global_batch_size} is not a multiple of --per-device-batch-size "
                f"{self.per_device_batch_size} × {self.world_size} ranks: choose sizes that divide it")
        return self.global_batch_size // per_step


def parse_assignments(values: list[str], what: str, groups=GROUPS) -> dict:
    """`GROUP=VALUE` strings (of option `--what`) as a dict; an unknown group raises `CogalignError`."""
    out = {}
    for v in values or []:
        name, sep, value = v.partition("=")
        if not sep or name not in groups:
            raise CogalignError(f"--{what} {v!r}: expected GROUP=VALUE with GROUP one of {', '.join(groups)}")
        out[name] = value
    return out


def make_plan(stage: int, world_size: int = 1, lr: Optional[list[str]] = None, global_batch_size: Optional[int] = None,
              per_device_batch_size: Optional[int] = None, epochs: float = 1.0,
              modules: Optional[list[str]] = None) -> Plan:
    """The stage preset with the user's overrides. `--lr GROUP=VALUE` sets a rate (and unfreezes the
    group); `--lr GROUP=frozen` freezes it; `--modules GROUP=REGEX` remaps a group for other models."""
    if stage not in STAGES:
        raise CogalignError(f"--stage {stage}: choose 1, 2 or 3 (Table 7)")
    lrs, batch = dict(STAGES[stage][0]), STAGES[stage][1]
    for name, value in parse_assignments(lr, "lr").items():
        if value == "frozen":
            lrs[name] = None
            continue
        try:
            lrs[name] = float(value)
        except ValueError:
            raise CogalignError(f"--lr {name}={value}: the rate must be a number (e.g. 1e-4) or 'frozen'") from None
        if not math.isfinite(lrs[name]) or not lrs[name] > 0:
            raise CogalignError(f"--lr {name}={value}: the rate must be a finite number above 0 (use {name}=frozen to freeze)")
    patterns = dict(DEFAULT_PATTERNS)
    for name, value in parse_assignments(modules, "modules").items():
        try:
            re.compile(value)
        except re.error as e:
            raise CogalignError(f"--modules {name}={value}: not a regular expression ({e})") from None
        patterns[name] = value
    g = global_batch_size or batch
    per_device = per_device_batch_size or max(1, min(8, g // world_size))
    plan = Plan(stage, lrs, g, per_device, world_size, epochs, patterns=patterns,
                custom=tuple(parse_assignments(modules, "modules")))
    plan.gradient_accumulation_steps  # raises when the sizes do not divide
    return plan


def group_params(model, plan: Plan) -> dict[str, list]:
    """Parameters per group (first matching pattern wins); requires_grad set from the plan. A group
    that matches nothing is an error when it trains or its pattern came from --modules. With new
    token rows (--vq-tokens special) and the LM frozen, the embedding and lm_head matrices train with
    a gradient mask that keeps every old row fixed: group "new_token_rows"."""
    out = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        group = next((g for g in GROUPS if re.search(plan.patterns[g], name)), None)
        trainable = group is not None and plan.lrs.get(group) is not None
        if plan.lora and group in ("projector", "language_model"):
            trainable = trainable and p.requires_grad  # peft's choice: LoRA matrices, the projector's copy
        p.requires_grad_(trainable)
        if group and (trainable or not plan.lora):
            out[group].append(p)
    for g in GROUPS:
        if not out[g] and (g in plan.custom or plan.lrs.get(g) is not None):
            how = f"--modules {g}={plan.patterns[g]!r}" if g in plan.custom else f"the {g} pattern {plan.patterns[g]!r}"
            raise CogalignError(f"{how} matches no parameter of the model: give a regular expression that "
                                f"matches its parameter names (--modules {g}=REGEX)")
    out["new_token_rows"] = new_token_params(model, plan) if plan.lrs["language_model"] is None or plan.lora else []
    return out


def new_token_params(model, plan: Plan) -> list:
    """The input and output embedding matrices, trainable on rows >= plan.new_token_start only."""
    if plan.new_token_start is None:
        return []
    import torch

    out = []
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        w = getattr(emb, "weight", None)
        if w is None or any(w is q for q in out):
            continue
        mask = torch.zeros((w.shape[0],) + (1,) * (w.dim() - 1), dtype=w.dtype, device=w.device)
        mask[plan.new_token_start:] = 1
        w.requires_grad_(True)
        if not getattr(w, "_cogalign_row_mask", False):
            w.register_hook(lambda g, m=mask: g * m.to(device=g.device, dtype=g.dtype))
            w._cogalign_row_mask = True
        out.append(w)
    return out


def plan_json(plan: Plan, model) -> dict:
    """The plan for `--print-plan`: stage, batch sizes, accumulation, and each group's rate and trainable
    parameter count."""
    params = group_params(model, plan)
    groups = [{"name": g, "lr": plan.lrs[g],
               "trainable_params": sum(p.numel() for p in params[g]) if plan.lrs[g] is not None else 0}
              for g in GROUPS]
    if params["new_token_rows"]:
        groups.append({"name": "new_token_rows", "lr": plan.new_token_lr, "trainable_params": sum(
            (p.shape[0] - plan.new_token_start) * p[0].numel() for p in params["new_token_rows"])})
    return {
        "stage": plan.stage,
        "global_batch_size": plan.global_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "warmup_ratio": plan.warmup_ratio,
        "weight_decay": plan.weight_decay,
        "groups": groups,
    }
