"""LoRA through peft, as LLaVA's `--lora_enable`: adapters on the language model's linear layers,
the projector trained in full (peft's `modules_to_save`, so the adapter folder holds it too)."""
from __future__ import annotations

import re
from typing import Optional

from cogalign.errors import CogalignError

__all__ = ["add_lora", "lm_linear_names"]


def lm_linear_names(model, plan, leaves: Optional[list[str]] = None) -> list[str]:
    """Full names of the language model's nn.Linear modules (lm_head excluded), optionally only those
    whose last name part is in `leaves` (e.g. q_proj, v_proj)."""
    import torch.nn as nn

    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.split(".")[-1] == "lm_head":
            continue
        if re.search(plan.patterns["language_model"], name + ".") and (not leaves or name.split(".")[-1] in leaves):
            names.append(name)
    return names


def add_lora(model, plan, r: int, alpha: float, dropout: float, target: Optional[str] = None):
    """`model` wrapped by peft with LoRA (rank `r`, `alpha`, `dropout`) on the LM's linear layers (or the leaf
    names in `target`); the projector is trained in full."""
    from peft import LoraConfig, get_peft_model

    if plan.lrs["language_model"] is None:
        raise CogalignError(f"--lora-r {r}: LoRA trains the language model, which stage {plan.stage} freezes; "
                            "give it a rate (--lr language_model=2e-4) or use --stage 3")
    leaves = [t.strip() for t in target.split(",") if t.strip()] if target else None
    names = lm_linear_names(model, plan, leaves)
    if not names:
        raise CogalignError(f"--lora-target {target!r}: no linear layer of the language model has that name "
                            "(e.g. q_proj,k_proj,v_proj,o_proj)")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                        modules_to_save=["multi_modal_projector"], bias="none")
    plan.lora = True
    return get_peft_model(model, config)
