"""`cogalign train`'s options → `transformers.TrainingArguments`.

Our options fill the Trainer's fields under their usual names; `--trainer-config FILE` (YAML or
JSON mapping) and then `--trainer-arg KEY=VALUE` (repeatable, VALUE read as YAML: 10, 1e-4, true,
[a, b]) set any other field and win over the options. Fields that the stage plan or another option
owns are refused, naming that option.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from cogalign.errors import CogalignError

__all__ = ["build_training_args", "training_kwargs", "parse_trainer_args", "field_names", "checkpointing_field",
           "OWNED"]

# TrainingArguments fields that our own options set: KEY -> the option to use instead
OWNED = {
    "output_dir": "--out", "per_device_train_batch_size": "--per-device-batch-size",
    "per_device_eval_batch_size": "--per-device-batch-size", "gradient_accumulation_steps": "--global-batch-size",
    "num_train_epochs": "--epochs", "max_steps": "--max-steps", "learning_rate": "--lr GROUP=VALUE",
    "remove_unused_columns": "(always off: the collator needs every key)", "resume_from_checkpoint": "--resume",
    "overwrite_output_dir": "--overwrite",
    "seed": "--seed (it also draws the held-out split and the tiny model; data_seed alone moves the data order)",
}


def field_names() -> dict:
    """TrainingArguments' init fields by name (transformers installed)."""
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def checkpointing_field() -> str:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name warns)."""
    return "activation_checkpointing" if "activation_checkpointing" in field_names() else "gradient_checkpointing"


def parse_trainer_args(pairs: Optional[list[str]], config: Optional[Path]) -> dict:
    """The config file's mapping, then each KEY=VALUE, checked against TrainingArguments' fields."""
    out, from_config, raw = {}, set(), {}
    if config is not None:
        if not Path(config).is_file():
            raise CogalignError(f"--trainer-config {config}: no such file (a YAML or JSON mapping of TrainingArguments fields)")
        try:
            loaded = yaml.safe_load(Path(config).read_text())  # JSON is YAML too
        except yaml.YAMLError as e:
            raise CogalignError(f"--trainer-config {config}: not YAML/JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise CogalignError(f"--trainer-config {config}: expected a mapping of TrainingArguments fields")
        out.update({str(k): v for k, v in loaded.items()})
        from_config = set(out)
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CogalignError(f"--trainer-arg {pair!r}: expected KEY=VALUE, e.g. --trainer-arg warmup_steps=0.1")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
        raw[key.strip()] = value.strip()
        from_config.discard(key.strip())
    fields = field_names()
    for key in list(out):
        where = f"--trainer-config {config}: {key}" if key in from_config else f"--trainer-arg {key}"
        if key not in fields:
            close = [f for f in fields if key.replace("-", "_") == f]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise CogalignError(f"{where}: not a TrainingArguments field{hint}; see "
                                "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments")
        if key in OWNED:
            raise CogalignError(f"{where}: set by cogalign train; use {OWNED[key]}")
        out[key] = _typed(key, out[key], raw.get(key), where)
    return out


@functools.lru_cache(maxsize=1)
def _field_types() -> dict:
    from transformers import TrainingArguments

    return typing.get_type_hints(TrainingArguments)


def _typed(key: str, value: Any, raw: Optional[str], where: str) -> Any:
    """VALUE as the field's type: `eval_strategy=no` stays the string "no" (YAML reads a bool),
    `adam_epsilon=1e-8` is a float (YAML reads a string); a value of another type is refused."""
    hint = _field_types().get(key)
    kinds = [typing.get_origin(k) or k for k in (typing.get_args(hint) or (hint,))]
    kinds = [k for k in kinds if isinstance(k, type)]
    if not kinds or any(k is Any for k in kinds):
        return value

    def fits(v) -> bool:
        return any((k is float and isinstance(v, (int, float)) and not isinstance(v, bool))
                   or (k is int and isinstance(v, int) and not isinstance(v, bool))
                   or (k not in (int, float) and isinstance(v, k)) for k in kinds)

    if fits(value):
        return value
    if raw is not None and (str in kinds or any(issubclass(k, enum.Enum) for k in kinds)):
        return raw  # a string field: keep what was typed
    for k in (int, float):
        if k in kinds and isinstance(value, str):
            try:
                return k(value)
            except ValueError:
                pass
    names = " or ".join(sorted({"null" if k is type(None) else k.__name__ for k in kinds}))
    hint = " (YAML reads no/yes/off/on as booleans: quote the word, e.g. 'no')" if isinstance(value, bool) else ""
    raise CogalignError(f"{where}={raw if raw is not None else value!r}: expected {names}{hint}")


def training_kwargs(*, out: Path, plan, seed: int, max_steps: Optional[int], epochs: float, options: dict,
                    extra: dict, has_eval: bool) -> dict:
    """The keyword arguments of TrainingArguments for this run (tests check what arrives here)."""
    kw = dict(
        output_dir=str(out), per_device_train_batch_size=plan.per_device_batch_size,
        per_device_eval_batch_size=plan.per_device_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        num_train_epochs=epochs, max_steps=max_steps or -1, seed=seed,
        lr_scheduler_type="cosine", warmup_steps=plan.warmup_ratio, weight_decay=plan.weight_decay,
        remove_unused_columns=False, average_tokens_across_devices=True, save_strategy="steps",
        logging_strategy="steps", disable_tqdm=True, ddp_find_unused_parameters=False,
        eval_strategy="steps" if has_eval else "no", dataloader_pin_memory=_has_gpu(), use_cpu=not _has_gpu(),
    )
    kw.update({k: v for k, v in options.items() if v is not None})
    if not has_eval:
        kw.pop("eval_steps", None)
    kw.update(extra)
    return kw


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def build_training_args(kwargs: dict):
    """`TrainingArguments(**kwargs)`; a value transformers refuses raises `CogalignError` in one line."""
    from transformers import TrainingArguments

    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CogalignError(f"the Trainer refused the arguments: {first}") from None
