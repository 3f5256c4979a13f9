"""Records and their images → a padded batch of tokens, labels, answer kinds and pixels.

`chat.py` renders a conversation (the model's chat template, or LLaVA's vicuna_v1) with the
character spans of its answers; the Encoder tokenizes it with offsets and supervises the tokens
that overlap those spans, so the labels are exact under any template.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Optional

from cogalign.targets.render import VQ_END, VQ_START
from cogalign.train import chat
from cogalign.train.chat import IMAGE, VICUNA_SYSTEM, answer_kind  # noqa: F401 (re-exported)

__all__ = ["Encoder", "Collator", "new_stats", "pad_rows", "vq_token_names", "to_special_vq", "from_special_vq",
           "has_image_token", "image_problem", "fit_image_processor", "IGNORE", "KINDS", "KIND_ID"]

IGNORE = -100
KINDS = ("original", "vq", "px")
KIND_ID = {"original": 1, "vq": 2, "px": 3}
_VQ_TOKEN = re.compile(r"<vq_(\d+)>")


def vq_token_names(k: int) -> list[str]:
    """The `--vq-tokens special` tokens `<vq_0>` … `<vq_{k-1}>`."""
    return [f"<vq_{i}>" for i in range(k)]


def to_special_vq(text: str) -> str:
    """`<vq start>3, 12<vq end>` → `<vq start><vq_3><vq_12><vq end>` (one token per index)."""
    from cogalign.targets.render import parse_vq

    return VQ_START + "".join(f"<vq_{int(i)}>" for i in parse_vq(text)) + VQ_END


def from_special_vq(text: str) -> str:
    """Inverse of `to_special_vq`; text that is not in the special form is returned unchanged."""
    if not (text.startswith(VQ_START) and text.endswith(VQ_END)):
        return text
    body = text[len(VQ_START):len(text) - len(VQ_END)]
    if body and _VQ_TOKEN.sub("", body).strip():
        return text
    return VQ_START + ", ".join(_VQ_TOKEN.findall(body)) + VQ_END


def has_image_token(turns: list[dict]) -> bool:
    """True when a human turn holds `<image>`."""
    return any(t["from"] == "human" and IMAGE in t["value"] for t in turns)


def image_problem(turns: list[dict], n_images: int, image: str = IMAGE) -> Optional[str]:
    """Why a record cannot be trained with its images (a skip reason), or None."""
    if any(t["from"] == "gpt" and image in t["value"] for t in turns):
        return "image_token_in_answer"
    if sum(t["value"].count(image) for t in turns if t["from"] == "human") != n_images:
        return "image_token_mismatch"
    return None


def fit_image_processor(processor, resize: str) -> None:
    """Make the processor show the model the image `expand`'s targets describe (its `--resize`):
    stretch or pad (LLaVA's expand2square with the mean colour) to the vision tower's square,
    never a centre crop (but for `crop`, whose targets describe the centre square). LLaVA-NeXT's
    anyres already covers the whole image; only its centre crop is turned off. Saved with the run,
    so `AutoProcessor.from_pretrained(RUN)` preprocesses as training did."""
    from transformers import LlavaImageProcessor

    ip = processor.image_processor
    if hasattr(ip, "image_grid_pinpoints"):
        ip.do_center_crop = False
        return
    size, crop = ip.crop_size or ip.size, ip.size
    h = size.height or crop.height or crop.shortest_edge
    w = size.width or crop.width or crop.shortest_edge
    resize_to = {"shortest_edge": min(h, w)} if resize == "crop" else {"height": h, "width": w}
    processor.image_processor = LlavaImageProcessor(
        size=resize_to, crop_size={"height": h, "width": w}, do_center_crop=resize == "crop",
        do_pad=resize == "pad", image_mean=ip.image_mean, image_std=ip.image_std, resample=ip.resample,
        rescale_factor=ip.rescale_factor, do_normalize=ip.do_normalize, do_rescale=ip.do_rescale)


class Encoder:
    """A conversation and its images → (input_ids, labels, kinds), tokenized as one string between
    the images (as LLaVA's tokenizer_image_token), each image expanded to the processor's count
    for it; the labels are the tokens that overlap the rendered answer spans (`chat.py`).
    --max-length cuts the end; the cut answers are counted per kind."""

    def __init__(self, processor, max_length: int = 2048, vq_tokens: str = "text", resize: Optional[str] = None):
        tok = processor.tokenizer
        self.processor, self.tok, self.max_length, self.vq_tokens = processor, tok, max_length, vq_tokens
        self.image_token = getattr(processor, "image_token", IMAGE)
        self.image_id = tok.convert_tokens_to_ids(self.image_token)
        self.template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
        self.eos = tok.eos_token or "</s>"
        if resize:
            fit_image_processor(processor, resize)
        self.anyres = hasattr(processor.image_processor, "image_grid_pinpoints")
        default_bos = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
        self.bos = [tok.bos_token_id] if tok.bos_token_id is not None and (default_bos or not self.template) else []

    # -- text
    def render(self, turns: list[dict], upto: Optional[int] = None, system: Optional[str] = None) -> chat.Rendered:
        """The turns as one string with the answer spans (the chat template if the tokenizer has one, else
        vicuna_v1); `upto`: the prompt before turn `upto`; `system`: the record's system prompt."""
        if self.vq_tokens == "special":
            turns = [{**t, "value": to_special_vq(t["value"])} if t["from"] == "gpt" and t["value"].startswith(VQ_START)
                     else t for t in turns]
        if self.template:
            return chat.template(self.tok, self.template, turns, upto, self.image_token, system)
        return chat.vicuna(turns, self.eos, upto, self.image_token, system)

    def _tokenize(self, text: str, budget: int) -> tuple[list, list, bool]:
        """(ids, offsets, cut) of `text`, at most `budget` tokens; a long text by growing prefixes."""
        if budget <= 0:
            return [], [], bool(text)
        chars = max(64, budget * 8)
        while True:
            got = self.tok(text[:chars], add_special_tokens=False, return_offsets_mapping=True)
            ids, offs = got["input_ids"], got["offset_mapping"]
            if chars >= len(text):
                return ids[:budget], offs[:budget], len(ids) > budget
            if len(ids) > budget + 1:  # the last token of a cut string may differ: keep clear of it
                return ids[:budget], offs[:budget], True
            chars *= 4

    def tokens(self, rendered: chat.Rendered, counts: list[int], limit: Optional[int] = None) -> dict:
        """Tokens of a rendered conversation; `counts`: image tokens per image, in order."""
        import numpy as np

        limit = self.max_length if limit is None else limit
        pieces = rendered.text.split(self.image_token)
        if len(pieces) - 1 != len(counts):
            raise ValueError("image_token_mismatch")
        add_bos = self.bos and not rendered.text.startswith(self.tok.bos_token or "\0")
        ids, starts, ends = list(self.bos if add_bos else []), [], []
        starts, ends = [-1] * len(ids), [-1] * len(ids)
        pos, cut = 0, False
        for i, piece in enumerate(pieces):
            got, offs, cut = self._tokenize(piece, limit - len(ids))
            ids += got
            starts += [pos + s for s, _ in offs]
            ends += [pos + e for _, e in offs]
            pos += len(piece) + len(self.image_token)
            if i < len(counts):
                if cut or limit - len(ids) < counts[i]:
                    raise ValueError("max_length_below_image")
                ids += [self.image_id] * counts[i]
                starts += [-1] * counts[i]
                ends += [-1] * counts[i]
            if cut:
                break
        s, e = np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)
        kinds = np.zeros(len(ids), dtype=np.int64)
        truncated, covered = Counter(), int(e.max(initial=-1))
        for a, b, kind in rendered.spans:
            kinds[(s >= 0) & (s < b) & (e > a)] = KIND_ID[kind]
            if cut and b > covered:
                truncated[kind] += 1
        labels = np.where(kinds > 0, np.array(ids, dtype=np.int64), IGNORE)
        return {"input_ids": ids, "labels": labels.tolist(), "kinds": kinds.tolist(), "truncated": truncated}

    # -- images
    def image_counts(self, images: list) -> list[int]:
        """Image tokens per image, as the processor expands them (LLaVA-NeXT: by the image's size)."""
        if not images:
            return []
        sizes = [(im.height, im.width) for im in images]
        try:
            return [int(n) for n in self.processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]]
        except (AttributeError, KeyError, TypeError):
            return [int((self.processor(text=self.image_token, images=[im], return_tensors="np")["input_ids"][0]
                         == self.image_id).sum()) for im in images]

    def pixels(self, images: list) -> dict:
        """`pixel_values` (and `image_sizes` for LLaVA-NeXT) of the images, in order."""
        if not images:
            return {}
        got = self.processor.image_processor(images, return_tensors="pt")
        return {k: got[k] for k in ("pixel_values", "image_sizes") if k in got}

    # -- records
    def encode_record(self, turns: list[dict], images: list, system: Optional[str] = None) -> dict:
        """The training row of a conversation with its images (and the record's system prompt); ValueError(reason)
        if it cannot be used."""
        problem = image_problem(turns, len(images))
        if problem:
            raise ValueError(problem)
        return self.tokens(self.render(turns, system=system), self.image_counts(images))

    def prompt_ids(self, turns: list[dict], upto: int, images: list = (), system: Optional[str] = None) -> list[int]:
        """The generation prompt of gpt turn `upto`: the same tokens training puts before its answer."""
        images = list(images)
        problem = image_problem(turns[:upto], len(images))
        if problem:
            raise ValueError(problem)
        return self.tokens(self.render(turns, upto, system), self.image_counts(images), limit=1 << 62)["input_ids"]

    # -- the earlier interface (generate): segments() then encode()
    def segments(self, turns: list[dict], with_image: bool, upto: Optional[int] = None) -> tuple:
        """What `encode` takes: the turns, whether the images are shown, and the prompt cut (the earlier
        interface)."""
        return turns, with_image, upto

    def encode(self, segments: tuple, add_bos: bool = True) -> dict:
        """input_ids, labels and kinds of `segments` (with `upto`: only the prompt's input_ids); `add_bos` is
        kept for the earlier interface."""
        turns, with_image, upto = segments
        n = sum(t["value"].count(IMAGE) for t in turns if t["from"] == "human") if with_image else 0
        if not with_image:
            turns = [{**t, "value": t["value"].replace(IMAGE, "").strip()} if t["from"] == "human" else t for t in turns]
        if self.anyres and n:
            raise ValueError("LLaVA-NeXT needs the images: use Encoder.prompt_ids / encode_record")
        counts = [self.num_image_tokens] * n
        if upto is not None:
            return {"input_ids": self.tokens(self.render(turns, upto), counts, limit=1 << 62)["input_ids"]}
        return self.tokens(self.render(turns), counts)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens of a square image (fixed for LLaVA-1.5)."""
        from PIL import Image

        ip = self.processor.image_processor
        side = (ip.crop_size or ip.size).height or ip.size.shortest_edge
        return self.image_counts([Image.new("RGB", (side, side))])[0]

    def decode_answer(self, ids: list[int]) -> str:
        """Generated ids as answer text: cut at the end of turn, special VQ tokens back to numbers."""
        text = self.tok.decode(ids, skip_special_tokens=False)
        ends = chat.end_of_turn_tokens(self.tok, self.image_token) if self.template else [self.eos]
        for end in ends:
            text = text.split(end)[0]
        return from_special_vq(text.strip())


def new_stats() -> dict:
    """Empty collator counters: records seen, skipped and cut (by reason and kind), padding slots."""
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
                skipped_ids.append(item.get("detail") or rec.get("id"))
                continue
            pictures = list(item.get("images") or [])
            try:
                row = self.enc.encode_record(rec["conversations"], pictures, chat.record_system(rec))
            except ValueError as e:
                stats["skipped"][str(e)] += 1
                skipped_ids.append(f"{rec.get('id')}: {e}")
                continue
            stats["seen"] += 1
            stats["truncated"].update(row["truncated"])
            stats["truncated_records"] += bool(row["truncated"])
            rows.append(row)
            images += pictures
        batch = pad_rows(rows, self.enc.tok.pad_token_id or 0)
        batch.update(self.enc.pixels(images))
        batch["stats"] = stats
        batch["skipped_ids"] = skipped_ids
        batch["positions"] = [it["position"] for it in items]
        return batch


def pad_rows(rows: list[dict], pad_id: int) -> dict:
    """Encoded rows as right-padded tensors: input_ids, labels (-100 on padding), kinds and attention_mask."""
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
