"""Table 7 stage presets, mapped onto LLaVA's modules, and the plan `--print-plan` shows.

The paper's perceiver, Epigone and denoising transformer are LLaVA's projector; its vision encoder
is the vision tower; its LLM is the language model with `lm_head`. One epoch, cosine schedule.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from cogalign.errors import CogalignError

GROUPS = ("projector", "vision_tower", "language_model")
# Parameter-name patterns (re.search) for transformers' LlavaForConditionalGeneration.
DEFAULT_PATTERNS = {
    "projector": r"(^|\.)multi_modal_projector\.",
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
    stage: int
    lrs: dict
    global_batch_size: int
    per_device_batch_size: int
    world_size: int = 1
    epochs: float = 1.0
    warmup_ratio: float = WARMUP_RATIO
    weight_decay: float = WEIGHT_DECAY
    patterns: dict = field(default_factory=lambda: dict(DEFAULT_PATTERNS))

    @property
    def gradient_accumulation_steps(self) -> int:
        per_step = self.per_device_batch_size * self.world_size
        if self.global_batch_size % per_step:
            raise CogalignError(
                f"--global-batch-size {self.global_batch_size} is not a multiple of --per-device-batch-size "
                f"{self.per_device_batch_size} × {self.world_size} ranks: choose sizes that divide it")
        return self.global_batch_size // per_step


def parse_assignments(values: list[str], what: str, groups=GROUPS) -> dict:
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
        if not lrs[name] > 0:
            raise CogalignError(f"--lr {name}={value}: the rate must be above 0 (use {name}=frozen to freeze)")
    patterns = dict(DEFAULT_PATTERNS)
    for name, value in parse_assignments(modules, "modules").items():
        try:
            re.compile(value)
        except re.error as e:
            raise CogalignError(f"--modules {name}={value}: not a regular expression ({e})") from None
        patterns[name] = value
    g = global_batch_size or batch
    per_device = per_device_batch_size or max(1, min(8, g // world_size))
    plan = Plan(stage, lrs, g, per_device, world_size, epochs, patterns=patterns)
    plan.gradient_accumulation_steps  # raises when the sizes do not divide
    return plan


def group_params(model, plan: Plan) -> dict[str, list]:
    """Parameters per group (first matching pattern wins); requires_grad set from the plan."""
    out = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        group = next((g for g in GROUPS if re.search(plan.patterns[g], name)), None)
        trainable = group is not None and plan.lrs.get(group) is not None
        p.requires_grad_(trainable)
        if group:
            out[group].append(p)
    return out


def plan_json(plan: Plan, model) -> dict:
    params = group_params(model, plan)
    return {
        "stage": plan.stage,
        "global_batch_size": plan.global_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "warmup_ratio": plan.warmup_ratio,
        "weight_decay": plan.weight_decay,
        "groups": [{"name": g, "lr": plan.lrs[g],
                    "trainable_params": sum(p.numel() for p in params[g]) if plan.lrs[g] is not None else 0}
                   for g in GROUPS],
    }
