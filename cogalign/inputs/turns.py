"""Chat-format records to LLaVA turns: `{role, content}` turns (LLaVA-NeXT) and records with
`messages` instead of `conversations` (TRL / Hugging Face chat format).

- roles: `user` -> `human`, `assistant` -> `gpt` (`human`, `gpt`, `system` stay as they are,
  so a leading system turn is still refused by the record check);
- content: a string, or typed parts: `{"type": "image"}` -> `<image>`, `{"type": "text",
  "text": ...}` -> the text, joined with newlines;
- `messages` becomes `conversations`; with it an `images` list becomes `image` (one path: a
  string; several: the list), when the record has no `image`;
- an image part that names its own file (`{"type": "image", "image"|"path"|"url": "a.png"}`)
  gives that path, in order, when the record has neither `image` nor `images`; an image part
  whose source is not a string (bytes, a PIL image) cannot be converted.

Anything that does not fit is left as it is, for the record check to reject with its reason.
"""
from __future__ import annotations

IMAGE_SOURCE_KEYS = ("image", "path", "url")
ROLES = {"user": "human", "assistant": "gpt", "human": "human", "gpt": "gpt", "system": "system"}


def _content(value):
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        parts = []
        for part in value:
            kind = part.get("type")
            if kind == "image":
                if any(part.get(k) is not None and not isinstance(part.get(k), str) for k in IMAGE_SOURCE_KEYS):
                    return value
                parts.append("<image>")
            elif kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                return value
        return "\n".join(parts)
    return value


def _turn(turn):
    if not isinstance(turn, dict) or turn.get("from") is not None or "role" not in turn:
        return turn, False
    role = turn["role"]
    if not isinstance(role, str) or role not in ROLES:
        return turn, False
    out = {"from": ROLES[role], "value": _content(turn.get("content"))}
    out.update((k, v) for k, v in turn.items() if k not in ("role", "content", "from", "value"))
    return out, True


def _inline_images(conv) -> list:
    """Paths named by image parts (`{"type": "image", "image": "a.png"}`), in turn order."""
    found = []
    for turn in conv if isinstance(conv, list) else ():
        content = turn.get("content") if isinstance(turn, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") == "image":
                found += [part[k] for k in IMAGE_SOURCE_KEYS if isinstance(part.get(k), str)][:1]
    return found


def to_llava(record):
    """(record with LLaVA turns, what was converted: "" | "role_content" | "messages")."""
    if not isinstance(record, dict):
        return record, ""
    converted = ""
    if "conversations" not in record and isinstance(record.get("messages"), list):
        record = {("conversations" if k == "messages" else k): v for k, v in record.items()}
        images = record.get("images")
        if "image" not in record and isinstance(images, list) and images and all(isinstance(i, str) for i in images):
            record = {("image" if k == "images" else k): (v if k != "images" else (v[0] if len(v) == 1 else v))
                      for k, v in record.items()}
        converted = "messages"
    conv = record.get("conversations")
    if isinstance(conv, list) and any(isinstance(t, dict) and t.get("from") is None and "role" in t for t in conv):
        turns, changed = zip(*(_turn(t) for t in conv))
        if any(changed):
            record = {**record, "conversations": list(turns)}
            inline = _inline_images(conv)
            if inline and "image" not in record and "images" not in record:
                record["image"] = inline[0] if len(inline) == 1 else inline
            converted = converted or "role_content"
    return record, converted
