"""`cogalign generate`: greedy answers to every inserted (VQ / RGB) turn, with the image and the
conversation up to that turn, as JSON lines {"id", "kind", "text"}."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

from cogalign.errors import CogalignError
from cogalign.train.collate import Encoder, answer_kind, has_image_token


def load_run(run: Path):
    """(model, processor, vq_tokens) from a `cogalign train` output folder (or any LLaVA checkpoint)."""
    from cogalign.train.model import require_transformers

    require_transformers()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from cogalign.train.run import RUN_CONFIG

    try:
        processor = AutoProcessor.from_pretrained(run)
        model = AutoModelForImageTextToText.from_pretrained(run)
    except (OSError, ValueError) as e:
        raise CogalignError(f"cannot load {run}: {str(e).splitlines()[0] if str(e) else e} "
                            "(give a `cogalign train --out` folder)") from None
    cfg = Path(run) / RUN_CONFIG
    vq_tokens = json.loads(cfg.read_text())["vq_tokens"] if cfg.exists() else "text"
    return model.eval(), processor, vq_tokens


def inserted_turns(record: dict) -> Iterator[tuple[int, str]]:
    """(index, kind) of each gpt turn whose answer is a VQ or RGB target."""
    for i, t in enumerate(record.get("conversations") or []):
        kind = answer_kind(t.get("value", "")) if t.get("from") == "gpt" else "original"
        if kind != "original":
            yield i, kind


def greedy_answers(model, enc: Encoder, item: dict, turns: Iterator[int], max_new_tokens: int) -> Iterator[str]:
    """Greedy answer to each gpt turn index in `turns` of a `ShardDataset` item, given its image and
    the conversation before that turn."""
    import torch

    conv = item["record"]["conversations"]
    device = next(model.parameters()).device
    with_image = item["image"] is not None and has_image_token(conv)
    pixels = enc.processor.image_processor([item["image"]], return_tensors="pt")["pixel_values"].to(device) \
        if with_image else None
    for i in turns:
        ids = torch.tensor([enc.encode(enc.segments(conv, with_image, upto=i))["input_ids"]], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=enc.tok.eos_token_id, pad_token_id=enc.tok.pad_token_id)
        yield enc.decode_answer(out[0, ids.shape[1]:].tolist())


def generate(model, processor, items: Iterator[dict], vq_tokens: str = "text", max_new_tokens: int = 256,
             max_length: int = 8192) -> Iterator[dict]:
    """Items are `ShardDataset` items (record + image); yields one prediction per inserted turn."""
    enc = Encoder(processor, max_length, vq_tokens)
    for item in items:
        rec = item["record"]
        if rec is None or item.get("skip"):
            continue
        turns = list(inserted_turns(rec))
        for (_, kind), text in zip(turns, greedy_answers(model, enc, item, (i for i, _ in turns), max_new_tokens)):
            yield {"id": rec.get("id"), "kind": kind, "text": text}


def run_generate(run: Path, data: Path, out: Path, limit: Optional[int] = None, image_root: Optional[Path] = None,
                 max_new_tokens: int = 256, progress: bool = True) -> dict:
    from cogalign.progress import Progress
    from cogalign.train.data import ShardDataset

    model, processor, vq_tokens = load_run(run)
    ds = ShardDataset(data, image_root=image_root, shuffle=False)
    n = min(ds.num_records, limit) if limit is not None else ds.num_records
    counts = {"records": 0, "answers": 0, "skipped": 0}

    def items():
        for k, item in enumerate(ds):
            if k >= n:
                return
            counts["records"] += 1
            counts["skipped"] += bool(item.get("skip"))
            yield item
            bar.advance(expanded=True)

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f, Progress(n, progress) as bar:
        for pred in generate(model, processor, items(), vq_tokens, max_new_tokens):
            f.write(json.dumps(pred) + "\n")
            counts["answers"] += 1
    return counts
