"""Chat-format records to LLaVA turns: `{role, content}` turns (LLaVA-NeXT) and records with
`messages` instead of `conversations` (TRL / Hugging Face chat format).

- roles: `user` -> `human`, `assistant` -> `gpt` (`human`, `gpt` stay as they are);
- leading `system` turns (TRL / HF chat data) move to the record's `system` key (their texts
  joined with newlines; LLaVA has no system turn, LLaMA-Factory's sharegpt reads `system`),
  never rejected; a `system` turn later on is still refused by the record check;
- content: a string, or typed parts: `{"type": "image"}` -> `<image>`, `{"type": "text",
  "text": ...}` -> the text, joined with newlines; OpenAI's `{"type": "image_url", "image_url":
  {"url": ...}}` (or a plain string) -> `<image>` with that image: a local path or a
  `file://` URL (absolute: needs `--allow-absolute-paths`); a remote URL (http, https, data)
  is kept as the image and the record check rejects it (`image_remote_url`: nothing is fetched);
- `messages` becomes `conversations`; with it an `images` list becomes `image` (one path: a
  string; several: the list), when the record has no `image`;
- an image part that names its own file (`{"type": "image", "image"|"path"|"url": "a.png"}`)
  gives that path, in order, when the record has neither `image` nor `images`; an image part
  whose source is not a string (bytes, a PIL image) cannot be converted; a record whose `image` /
  `images` names other files than its image parts is rejected (`image_conflict`: which is meant?).

Anything that does not fit is left as it is, for the record check to reject with its reason.
"""
from __future__ import annotations

from cogalign.errors import RecordError

__all__ = ["to_llava", "IMAGE_SOURCE_KEYS", "IMAGE_PART_TYPES", "ROLES"]

IMAGE_SOURCE_KEYS = ("image", "path", "url")
IMAGE_PART_TYPES = ("image", "image_url")
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
            elif kind == "image_url":
                if _image_url(part) is None:
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


def _image_url(part: dict) -> str | None:
    """The image an OpenAI `image_url` part names (`file://` URLs as paths), or None."""
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        return None
    if url.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(url).path)
    return url


def _inline_images(conv) -> list:
    """Paths named by image parts (`{"type": "image", "image": "a.png"}`, `image_url`), in turn order."""
    found = []
    for turn in conv if isinstance(conv, list) else ():
        content = turn.get("content") if isinstance(turn, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") == "image":
                found += [part[k] for k in IMAGE_SOURCE_KEYS if isinstance(part.get(k), str)][:1]
            elif isinstance(part, dict) and part.get("type") == "image_url" and _image_url(part) is not None:
                found.append(_image_url(part))
    return found


def _lift_system(record: dict) -> dict:
    """Leading system turns -> the record's `system` text (after any `system` it already has)."""
    conv = record["conversations"]
    n = next((i for i, t in enumerate(conv) if not (isinstance(t, dict) and t.get("from") == "system")), len(conv))
    texts = [t.get("value") for t in conv[:n]]
    if not n or not all(isinstance(t, str) for t in texts):
        return record
    if isinstance(record.get("system"), str):
        texts.insert(0, record["system"])
    elif record.get("system") is not None:
        return record
    return {**record, "system": "\n".join(texts), "conversations": conv[n:]}


def _check_same_images(record: dict, inline: list) -> None:
    """A record that names its images twice (`image`/`images` and image parts) must name the same ones."""
    given = record.get("image", record.get("images"))
    given = [given] if isinstance(given, str) else given
    if isinstance(given, list) and all(isinstance(g, str) for g in given) and given != inline:
        raise RecordError("image_conflict", f"its image parts name {inline} but the record's "
                          f"`{'image' if 'image' in record else 'images'}` is {given}; keep one of the two")


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
            record = _lift_system({**record, "conversations": list(turns)})
            inline = _inline_images(conv)
            if inline and "image" not in record and "images" not in record:
                record["image"] = inline[0] if len(inline) == 1 else inline
            elif inline:
                _check_same_images(record, inline)
            converted = converted or "role_content"
    return record, converted
