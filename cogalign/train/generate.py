"""`cogalign generate`: greedy answers to every inserted (VQ / RGB) turn, given the image and the
conversation before that turn, as JSON lines {"id", "index", "turn", "kind", "text", "finished",
"turns_dropped"}: `index` is the record's position in shard order, `turn` the answer's index in its
conversation, `finished` false for an answer cut at `max_new_tokens`.

Prompts are decoded in batches, left-padded, with the model's own `generate()` (greedy): in
float32 a row's answer does not depend on the batch it is in. A prompt longer than `max_length` tokens loses whole
earlier turns, oldest first (a question with the answers after it); the image moves to the first
kept question, and the question being answered always stays. `turns_dropped` counts the turns a
prompt lost. A prompt over `max_length` with only the image and its question is not answered and
is counted as `too_long`; one that cannot be built (`<image>` marks that do not match the record's
images) is counted under that reason.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from cogalign.errors import CogalignError
from cogalign.train.chat import end_of_turn_tokens, record_system
from cogalign.train.collate import IMAGE, Encoder, answer_kind, has_image_token

__all__ = ["generate", "run_generate", "load_run", "run_config", "Prompt", "prompts", "inserted_turns",
           "item_images", "fit_prompt", "stop_ids", "answer_batch", "greedy_answers", "check_out",
           "DEFAULT_BATCH_SIZE", "DEFAULT_MAX_LENGTH"]

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 2048  # when the run folder does not say what it was trained with


def load_run(run: Path):
    """(model, processor, vq_tokens) from a `cogalign train` output folder (or any LLaVA checkpoint)."""
    from cogalign.train.model import quiet_hub_logs, require_transformers

    require_transformers()
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar: generate shows its own
    if (Path(run) / "adapter").is_dir() and not (Path(run) / "config.json").is_file():
        raise CogalignError(f"{run} holds a LoRA adapter only ({Path(run) / 'adapter'}), no model: it was trained "
                            "without --merge-lora; train again with --merge-lora to leave a model generate can load")
    try:
        with quiet_hub_logs():
            processor = AutoProcessor.from_pretrained(run)
            model = AutoModelForImageTextToText.from_pretrained(run)
    except (OSError, ValueError) as e:
        raise CogalignError(f"cannot load {run}: {str(e).splitlines()[0] if str(e) else e} "
                            "(give a `cogalign train --out` folder)") from None
    return model.eval(), processor, run_config(run).get("vq_tokens", "text")


def run_config(run: Path) -> dict:
    """What `cogalign train` recorded about the run (vq_tokens, max_length), {} for other checkpoints."""
    from cogalign.train.run import RUN_CONFIG

    try:
        return json.loads((Path(run) / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return {}


def inserted_turns(record: dict) -> Iterator[tuple[int, str]]:
    """(index, kind) of each gpt turn whose answer is a VQ or RGB target."""
    for i, t in enumerate(record.get("conversations") or []):
        kind = answer_kind(t.get("value", "")) if t.get("from") == "gpt" else "original"
        if kind != "original":
            yield i, kind


@dataclass
class Prompt:
    """One inserted turn to answer: record id and position, turn index, kind, prompt ids (None when it cannot be
    asked, `problem` says why), images, earlier turns dropped to fit."""
    id: object
    index: int  # the record's position in shard order
    turn: int
    kind: str
    ids: Optional[list]  # None: not answered, for the reason in `problem`
    images: list
    dropped: int  # earlier turns left out to fit max_length
    problem: Optional[str] = None  # too_long: over max_length with only the image(s) and the question


def item_images(item: dict) -> list:
    """The images a `ShardDataset` item shows the model: none unless a human turn has `<image>`."""
    images = item.get("images") or []
    return list(images) if images and has_image_token(item["record"]["conversations"]) else []


def fit_prompt(enc: Encoder, turns: list[dict], upto: int, images: list, max_length: int,
               system: Optional[str] = None):
    """(ids, turns dropped, problem) of the prompt for turn `upto` within `max_length` tokens, dropping
    whole earlier turns (each start is a human turn); the `<image>` marks of the dropped turns move to
    the first kept one. (None, upto, "too_long") when even the question alone is too long; ValueError
    (a reason) when the record cannot be prompted at all."""
    starts = [0] + [j for j in range(1, upto) if turns[j].get("from") == "human"]
    for j in starts:
        kept = list(turns[j:upto + 1])
        moved = sum(t["value"].count(IMAGE) for t in turns[:j] if t.get("from") == "human") if images else 0
        if moved:
            kept[0] = {**kept[0], "value": f"{IMAGE}\n" * moved + kept[0]["value"]}
        try:
            ids = enc.prompt_ids(kept, upto - j, images, system)
        except ValueError as e:
            if str(e) == "max_length_below_image":  # not even the image fits
                break
            raise
        if len(ids) <= max_length:
            return ids, j, None
    return None, upto, "too_long"


def prompts(enc: Encoder, items: Iterator[dict], max_length: int) -> Iterator[Prompt]:
    """One prompt per inserted turn of each usable `ShardDataset` item, in record and turn order."""
    for item in items:
        rec = item["record"]
        if rec is None or item.get("skip"):
            continue
        conv, images = rec["conversations"], item_images(item)
        for i, kind in inserted_turns(rec):
            try:
                ids, dropped, problem = fit_prompt(enc, conv, i, images, max_length, record_system(rec))
            except ValueError as e:
                ids, dropped, problem = None, 0, str(e)
            yield Prompt(rec.get("id"), item["position"], i, kind, ids, images, dropped, problem)


def stop_ids(model, enc: Encoder) -> list[int]:
    """End ids: the tokenizer's eos, the template's end-of-turn tokens and the generation config's."""
    tok = enc.tok
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if enc.template:
        ids += tok.convert_tokens_to_ids(end_of_turn_tokens(tok, enc.image_token))
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [] if extra is None else [extra]
    return list(dict.fromkeys(ids))


def answer_batch(model, enc: Encoder, batch: list[Prompt], max_new_tokens: int) -> list[tuple[str, bool]]:
    """(answer, finished) per prompt: greedy, left-padded; finished is False when `max_new_tokens` cut it."""
    import torch

    device = next(model.parameters()).device
    stops = stop_ids(model, enc)
    pad = enc.tok.pad_token_id if enc.tok.pad_token_id is not None else (stops or [0])[0]
    width = max(len(p.ids) for p in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, p in enumerate(batch):
        ids[r, width - len(p.ids):] = torch.tensor(p.ids)
        mask[r, width - len(p.ids):] = 1
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    images = [im for p in batch for im in p.images]
    if images:
        dtype = next(model.parameters()).dtype
        for key, value in enc.pixels(images).items():
            inputs[key] = value.to(device, dtype) if value.is_floating_point() else value.to(device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=stops or None, pad_token_id=pad)
    answers = []
    for row in out[:, width:].tolist():
        end = next((k for k, t in enumerate(row) if t in stops), None)
        answers.append((enc.decode_answer(row if end is None else row[:end]), end is not None))
    return answers


def greedy_answers(model, enc: Encoder, item: dict, turns, max_new_tokens: int) -> list[str]:
    """Greedy answers to the gpt turn indices `turns` of one `ShardDataset` item, in one batch, each
    given the image and the conversation before it (cut by the encoder's max_length, not shortened)."""
    conv, images = item["record"]["conversations"], item_images(item)
    system = record_system(item["record"])
    batch = [Prompt(item["record"].get("id"), item["position"], i, "", enc.prompt_ids(conv, i, images, system), images, 0)
             for i in turns]
    return [text for text, _ in answer_batch(model, enc, batch, max_new_tokens)] if batch else []


def generate(model, processor, items: Iterator[dict], vq_tokens: str = "text", max_new_tokens: int = 256,
             max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = DEFAULT_BATCH_SIZE,
             counts: Optional[dict] = None) -> Iterator[dict]:
    """Items are `ShardDataset` items (record + image); yields one prediction per inserted turn that
    fits `max_length`, in order. `counts` (if given) gets shortened, turns_dropped, and unanswered
    {reason: prompts} (too_long: over max_length with only the image and the question)."""
    enc = Encoder(processor, max_length + 1, vq_tokens)
    counts = counts if counts is not None else {}
    for key in ("shortened", "turns_dropped"):
        counts.setdefault(key, 0)
    counts.setdefault("unanswered", {})
    batch: list[Prompt] = []

    def flush():
        for p, (text, finished) in zip(batch, answer_batch(model, enc, batch, max_new_tokens)):
            yield {"id": p.id, "index": p.index, "turn": p.turn, "kind": p.kind, "text": text, "finished": finished,
                   "turns_dropped": p.dropped}
        batch.clear()

    for p in prompts(enc, items, max_length):
        if p.ids is None:
            counts["unanswered"][p.problem] = counts["unanswered"].get(p.problem, 0) + 1
            continue
        counts["shortened"] += p.dropped > 0
        counts["turns_dropped"] += p.dropped
        batch.append(p)
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()


def check_out(out: Path, overwrite: bool, data: Optional[Path] = None) -> None:
    """Refuse, before any work, an --out that is a folder, or a file that --overwrite does not allow (with
    `data`: a file of that expand output or its input)."""
    out = Path(out)
    if out.is_dir():
        raise CogalignError(f"--out {out} is a folder: name a .jsonl file, e.g. {out / 'predictions.jsonl'}")
    if out.exists() and not overwrite:
        raise CogalignError(f"--out {out} exists: choose another file, or pass --overwrite to replace it")
    if data is not None and out.resolve().is_relative_to(Path(data).resolve()):
        raise CogalignError(f"--out {out}: is inside the --data folder {data}; write it outside, e.g. predictions.jsonl")
    if out.is_file():
        _check_replaceable(out, data)
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CogalignError(f"--out {out}: {parent} is a file, not a folder; choose another path")
            break


def _check_replaceable(out: Path, data: Optional[Path]) -> None:
    """--overwrite replaces a text file, never a binary one (an image, a parquet shard) nor the input the
    --data run read."""
    from cogalign.expand.layout import read_manifest
    from cogalign.hub.export import _text, is_run_input

    if not _text(out):
        raise CogalignError(f"--out {out}: exists and is a binary file (an image?), so generate did not write it; "
                            "it is never replaced, --overwrite or not: choose another file")
    try:
        manifest = read_manifest(Path(data)) if data is not None else None
    except CogalignError:
        manifest = None
    if manifest is not None and is_run_input(out, manifest):
        raise CogalignError(f"--out {out}: is the input the --data run read; it is never replaced: choose another file")


def run_generate(run: Path, data: Path, out: Path, limit: Optional[int] = None, image_root: Optional[Path] = None,
                 max_new_tokens: int = 256, progress: bool = True, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_length: Optional[int] = None, overwrite: bool = False, device: Optional[str] = None) -> dict:
    """Answer the inserted turns of the first `limit` records of `data` into `out` (JSON lines);
    returns the summary counts. `out` is written to a temporary sibling and renamed at the end."""
    from cogalign.expand.progress import Progress
    from cogalign.train.data import ShardDataset, check_expand_output

    check_out(out, overwrite, data)
    check_expand_output(data)  # a missing shard would leave its turns unanswered without a word
    ds = ShardDataset(data, image_root=image_root, shuffle=False)
    model, processor, vq_tokens = load_run(run)
    config = run_config(run)
    if device:
        model.to(device)
    max_length = max_length or config.get("max_length") or DEFAULT_MAX_LENGTH
    n = min(ds.num_records, limit) if limit is not None else ds.num_records
    counts = {"records": 0, "answers": 0, "unfinished": 0, "skipped": 0, "max_length": max_length}

    def items():  # records are read as the batches need them: the bar lags by at most one batch
        for k, item in enumerate(ds):
            if k >= n:
                return
            counts["records"] += 1
            counts["skipped"] += bool(item.get("skip"))
            yield item
            bar.advance(expanded=bool(item["images"]))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    started = time.perf_counter()
    try:
        with open(partial, "w") as f, Progress(n, progress, label="records") as bar:
            for pred in generate(model, processor, items(), vq_tokens, max_new_tokens,
                                 max_length, batch_size, counts):
                f.write(json.dumps(pred) + "\n")
                counts["answers"] += 1
                counts["unfinished"] += not pred["finished"]
        os.replace(partial, out)
    finally:
        if partial.exists():
            partial.unlink()
    counts["seconds"] = round(time.perf_counter() - started, 2)
    return counts
