"""A LLaVA conversation rendered as one string, with the character spans to supervise.

The model's chat template renders it when it has one; else LLaVA's vicuna_v1 format
(`SYSTEM USER: <image>\\nh ASSISTANT: g</s>USER: ...`). Each gpt answer's span runs from the start
of the answer to the end of the template's end-of-turn token (`</s>`, `<|im_end|>`,
`<|eot_id|>` ...); where the template ends an assistant turn without one (llava-hf 1.5), the
tokenizer's eos is put there and supervised, as LLaVA's preprocess_v1 does. Spans come from the
template's `{% generation %}` markers where it has them, else from rendering the conversation's
prefixes (turn k itself after the prompt of turn k): never from searching for the answer's text.
A span starts where the generation prompt of its turn ends, so the blank between the prompt and
the answer (`ASSISTANT:` + ` A`) is supervised with it and the prompt is the training prefix. `upto=k` renders the generation prompt of gpt turn k.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from cogalign.errors import CogalignError
from cogalign.targets.render import RGB_START, VQ_START

__all__ = ["Rendered", "vicuna", "template", "messages", "record_system", "answer_kind", "split_images", "end_of_turn_tokens",
           "close_turns", "IMAGE", "VICUNA_SYSTEM"]

IMAGE = "<image>"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def answer_kind(text: str) -> str:
    """The kind of a gpt answer: `vq`, `px` (its start tag) or `original`."""
    if text.startswith(VQ_START):
        return "vq"
    return "px" if text.startswith(RGB_START) else "original"


@dataclass
class Rendered:
    """A conversation rendered as one string (one image token per image) with the (start, end, kind) spans to
    supervise."""
    text: str                                   # one `image_token` per image
    spans: list = field(default_factory=list)   # (start, end, kind) of each supervised answer + end of turn


def split_images(value: str) -> tuple[int, str]:
    """LLaVA's preprocess_multimodal: the `<image>` tokens of a human turn go in front of its text."""
    n = value.count(IMAGE)
    return n, (value.replace(IMAGE, "").strip() if n else value)


def record_system(record: dict) -> Optional[str]:
    """The record's own system prompt (its `system` key: chat data's system turns), or None."""
    system = record.get("system")
    return system if isinstance(system, str) and system.strip() else None


def vicuna(turns: list[dict], eos: str, upto: Optional[int] = None, image: str = IMAGE,
           system: Optional[str] = None) -> Rendered:
    """LLaVA's conv_vicuna_v1 `get_prompt()` (`image`: the model's image token; `system`: the record's system
    prompt in place of vicuna's); with `upto`, the prompt ends in `ASSISTANT:`."""
    text, spans = (system or VICUNA_SYSTEM) + " ", []
    for i, turn in enumerate(turns):
        if turn["from"] == "human":
            n, value = split_images(turn["value"])
            text += "USER: " + (image + "\n") * n + value + " "
        elif i == upto:
            return Rendered(text + "ASSISTANT:", spans)
        else:
            text += "ASSISTANT:"
            start = len(text)  # the answer's span starts where the generation prompt ends
            text += " " + turn["value"] + eos
            spans.append((start, len(text), answer_kind(turn["value"])))
    return Rendered(text, spans)


def messages(turns: list[dict]) -> list[dict]:
    """LLaVA turns → chat messages with typed parts (`{"type": "image"}` in front of the text)."""
    out = []
    for turn in turns:
        if turn["from"] == "human":
            n, value = split_images(turn["value"])
            out.append({"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": value}]})
        else:
            out.append({"role": "assistant", "content": [{"type": "text", "text": turn["value"]}]})
    return out


def _render(tok, template: str, msgs: list[dict], prompt: bool, marks: bool = False):
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, indices = render_jinja_template([msgs], chat_template=template, return_assistant_tokens_mask=marks,
                                           add_generation_prompt=prompt, **tok.special_tokens_map)
    return (texts[0], indices[0]) if marks else texts[0]


def end_of_turn_tokens(tok, image: str) -> list[str]:
    """The special tokens that may end an assistant turn (eos and the added special tokens)."""
    skip = {tok.bos_token, tok.pad_token, tok.unk_token, image, None}
    found = {tok.eos_token} | {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special}
    return sorted((t for t in found if t not in skip), key=len, reverse=True)


def template(tok, chat_template: str, turns: list[dict], upto: Optional[int] = None,
             image: str = IMAGE, system: Optional[str] = None) -> Rendered:
    """The turns rendered through `chat_template` (answer spans from `{% generation %}` marks, else from prefix
    renders); `upto`: the prompt before turn `upto`; `system`: a leading system message."""
    lead = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    msgs = lead + messages(turns[:upto] if upto is not None else turns)
    assistants = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    prompt, marked = upto is not None, bool(_GENERATION.search(chat_template))
    text, marks = _render(tok, chat_template, msgs, prompt, marks=True) if marked else \
        (_render(tok, chat_template, msgs, prompt), None)
    raw = []
    for j, k in enumerate(assistants):
        # an answer starts where its generation prompt ends, so the prompt is the training prefix
        head = _render(tok, chat_template, msgs[:k], True)
        if marked and j < len(marks):
            start, end = marks[j]
            raw.append((len(head) if text.startswith(head) and len(head) <= start else start, end))
            continue
        whole = _render(tok, chat_template, msgs[:k + 1], False)
        if not (whole.startswith(head) and text.startswith(whole)):
            raise CogalignError("the chat template renders a conversation differently from its beginning "
                                "(not prefix-stable): add {% generation %} markers around the assistant text")
        raw.append((len(head), len(whole)))
    return close_turns(Rendered(text), raw, [answer_kind(msgs[k]["content"][0]["text"]) for k in assistants],
                       end_of_turn_tokens(tok, image), tok.eos_token or "")


def close_turns(rendered: Rendered, raw: list, kinds: list, ends: list, eos: str) -> Rendered:
    """Each raw assistant span, less trailing blanks, plus the end-of-turn token that ends it or
    follows it; with none, `eos` is put in the text there."""
    text, spans, shift = rendered.text, [], 0
    for (start, end), kind in zip(raw, kinds):
        start, end = start + shift, end + shift
        end = start + len(text[start:end].rstrip())
        if not any(text.startswith(t, end - len(t)) for t in ends if end - len(t) >= start):
            after = next((t for t in ends if text.startswith(t, end)), None)
            if after is None:
                text = text[:end] + eos + text[end:]
                shift += len(eos)
                after = eos
            end += len(after)
        spans.append((start, end, kind))
    return Rendered(text, spans)
