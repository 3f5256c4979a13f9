"""Conversation → tokens, labels and images for a LLaVA model.

A conversation is rendered as segments (text, kind): kind None is masked (system prompt, roles,
human turns), "image" is the image placeholder (expanded to the processor's image-token count),
and "original" / "vq" / "px" are supervised gpt answers. Each segment is tokenized on its own, so
the masking is exact by construction. The model's chat template is used when it has one; else
LLaVA's vicuna_v1 format (`SYSTEM USER: h ASSISTANT: g</s>USER: ...`), where the answer and its
`</s>` are supervised, as LLaVA's trainer does.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Optional


from cogalign.render import RGB_START, VQ_END, VQ_START

IGNORE = -100
KINDS = ("original", "vq", "px")
KIND_ID = {"original": 1, "vq": 2, "px": 3}
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE = "<image>"
_VQ_TOKEN = re.compile(r"<vq_(\d+)>")


def answer_kind(text: str) -> str:
    if text.startswith(VQ_START):
        return "vq"
    return "px" if text.startswith(RGB_START) else "original"


def vq_token_names(k: int) -> list[str]:
    return [f"<vq_{i}>" for i in range(k)]


def to_special_vq(text: str) -> str:
    """`<vq start>3, 12<vq end>` → `<vq start><vq_3><vq_12><vq end>` (one token per index)."""
    from cogalign.render import parse_vq

    return VQ_START + "".join(f"<vq_{int(i)}>" for i in parse_vq(text)) + VQ_END


def from_special_vq(text: str) -> str:
    """Inverse of `to_special_vq`; text that is not in the special form is returned unchanged."""
    if not (text.startswith(VQ_START) and text.endswith(VQ_END)):
        return text
    body = text[len(VQ_START):len(text) - len(VQ_END)]
    if body and _VQ_TOKEN.sub("", body).strip():
        return text
    return VQ_START + ", ".join(_VQ_TOKEN.findall(body)) + VQ_END


def _human(value: str, with_image: bool) -> tuple[bool, str]:
    """LLaVA's preprocess_multimodal: strip `<image>` and put one `<image>\\n` in front."""
    if IMAGE in value:
        return with_image, value.replace(IMAGE, "").strip()
    return False, value


def has_image_token(turns: list[dict]) -> bool:
    return any(t["from"] == "human" and IMAGE in t["value"] for t in turns)


def vicuna_segments(turns: list[dict], with_image: bool, eos: str, upto: Optional[int] = None) -> list:
    """Segments of a conversation; with `upto` = i (a gpt turn's index), the prompt before turn i."""
    segs, masked = [], VICUNA_SYSTEM + " "
    for i, turn in enumerate(turns):
        if turn["from"] == "human":
            img, text = _human(turn["value"], with_image)
            with_image = with_image and not img  # one image, placed at its first <image>
            if img:
                segs.append((masked + "USER: ", None))
                segs.append((IMAGE, "image"))
                masked = "\n"
            else:
                masked += "USER: "
            masked += text + " ASSISTANT: "
        else:
            if i == upto:
                break
            segs.append((masked, None))
            kind = answer_kind(turn["value"])
            segs += [(turn["value"], kind), (eos, kind)]
            masked = ""
    if masked:
        segs.append((masked, None))
    return segs


def template_segments(tokenizer, template: str, turns: list[dict], with_image: bool, upto: Optional[int] = None) -> list:
    """Segments from the model's chat template: each message's text is found in order in the
    rendered string; an answer's end-of-sequence marker right after it is supervised with it."""
    messages, contents = [], []
    for i, turn in enumerate(turns):
        if i == upto:
            break
        if turn["from"] == "human":
            img, text = _human(turn["value"], with_image)
            with_image = with_image and not img
            parts = ([{"type": "image"}] if img else []) + [{"type": "text", "text": text}]
            messages.append({"role": "user", "content": parts})
            contents += [(IMAGE, "image")] if img else []
            contents.append((text, None))
        else:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["value"]}]})
            contents.append((turn["value"], answer_kind(turn["value"])))
    rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=upto is not None)
    segs, pos, eos = [], 0, tokenizer.eos_token or ""
    for text, kind in contents:
        at = rendered.find(text, pos)
        if at < 0 or not text:
            continue  # the template dropped or rewrote it: it stays in the masked text
        segs.append((rendered[pos:at], None))
        segs.append((text, kind if kind else None))
        pos = at + len(text)
        if kind not in (None, "image") and eos and rendered.startswith(eos, pos):
            segs.append((eos, kind))
            pos += len(eos)
    segs.append((rendered[pos:], None))
    return [s for s in segs if s[0]]


class Encoder:
    """Segments → (input_ids, labels, kinds) with --max-length truncation counted per answer kind."""

    def __init__(self, processor, max_length: int = 2048, vq_tokens: str = "text"):
        tok = processor.tokenizer
        self.processor, self.tok, self.max_length, self.vq_tokens = processor, tok, max_length, vq_tokens
        self.image_token = getattr(processor, "image_token", IMAGE)
        self.image_id = tok.convert_tokens_to_ids(self.image_token)
        self.template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
        self.eos = tok.eos_token or "</s>"
        self.num_image_tokens = self._count_image_tokens()

    def _count_image_tokens(self) -> int:
        from PIL import Image

        size = self.processor.image_processor.crop_size or self.processor.image_processor.size
        side = size.get("height") or size.get("shortest_edge")
        got = self.processor(text=self.image_token, images=Image.new("RGB", (side, side)), return_tensors="np")
        return int((got["input_ids"][0] == self.image_id).sum())

    def segments(self, turns: list[dict], with_image: bool, upto: Optional[int] = None) -> list:
        if self.template:
            return template_segments(self.tok, self.template, turns, with_image, upto)
        return vicuna_segments(turns, with_image, self.eos, upto)

    def _ids(self, text: str, budget: int) -> tuple[list[int], bool]:
        """Token ids of `text`, at most `budget`; a long text is tokenized by growing prefixes."""
        chars = max(64, budget * 8)
        while True:
            ids = self.tok(text[:chars], add_special_tokens=False)["input_ids"]
            if len(ids) > budget:
                return ids[:budget], True
            if chars >= len(text):
                return ids, False
            chars *= 4

    def encode(self, segments: list, add_bos: bool = True) -> dict:
        ids, labels, kinds, truncated = [], [], [], Counter()
        if add_bos and self.tok.bos_token_id is not None and not self.template:
            ids, labels, kinds = [self.tok.bos_token_id], [IGNORE], [0]
        for text, kind in segments:
            budget = self.max_length - len(ids)
            if kind == "image":
                if budget < self.num_image_tokens:
                    raise ValueError("max_length_below_image")
                seg = [self.image_id] * self.num_image_tokens
                cut = False
            else:
                if kind == "vq" and self.vq_tokens == "special" and text.startswith(VQ_START):
                    text = to_special_vq(text)
                seg, cut = self._ids(text, budget) if budget > 0 else ([], bool(text))
            supervised = kind in KIND_ID
            ids += seg
            labels += seg if supervised else [IGNORE] * len(seg)
            kinds += [KIND_ID[kind] if supervised else 0] * len(seg)
            if cut and supervised and text != self.eos:  # count each answer once, not its end marker
                truncated[kind] += 1
        return {"input_ids": ids, "labels": labels, "kinds": kinds, "truncated": truncated}

    def decode_answer(self, ids: list[int]) -> str:
        text = self.tok.decode(ids, skip_special_tokens=False)
        text = text.split(self.eos)[0].strip() if self.eos else text.strip()
        return from_special_vq(text)


def new_stats() -> dict:
    return {"seen": 0, "skipped": Counter(), "truncated": Counter(), "truncated_records": 0, "padding": 0}


class Collator:
    """Items from `ShardDataset` → a padded batch; the batch's counts travel in batch["stats"]."""

    def __init__(self, encoder: Encoder):
        self.enc = encoder

    def __call__(self, items: list[dict]) -> dict:
        stats, rows, images, skipped_ids = new_stats(), [], [], []
        for item in items:
            rec = item["record"]
            if rec is None:
                stats["padding"] += 1
                continue
            if item.get("skip"):
                stats["skipped"][item["skip"]] += 1
                skipped_ids.append(item.get("detail", rec.get("id")))
                continue
            with_image = item["image"] is not None and has_image_token(rec["conversations"])
            try:
                row = self.enc.encode(self.enc.segments(rec["conversations"], with_image))
            except ValueError as e:
                stats["skipped"][str(e)] += 1
                skipped_ids.append(f"{rec.get('id')}: {e}")
                continue
            stats["seen"] += 1
            stats["truncated"].update(row["truncated"])
            stats["truncated_records"] += bool(row["truncated"])
            rows.append(row)
            if with_image:
                images.append(item["image"])
        batch = pad_rows(rows, self.enc.tok.pad_token_id or 0)
        if images:
            batch["pixel_values"] = self.enc.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        batch["stats"] = stats
        batch["skipped_ids"] = skipped_ids
        batch["positions"] = [it["position"] for it in items]
        return batch


def pad_rows(rows: list[dict], pad_id: int) -> dict:
    import torch

    if not rows:
        return {"input_ids": torch.zeros((0, 1), dtype=torch.long)}
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    kinds = torch.zeros((len(rows), n), dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        labels[i, :k] = torch.tensor(r["labels"])
        kinds[i, :k] = torch.tensor(r["kinds"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "kinds": kinds, "attention_mask": mask}
