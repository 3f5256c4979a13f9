"""`cogalign export`: an output folder as the files other trainers read, each record checked first.

Formats:
- `llava-json`: one JSON array for LLaVA's `LazySupervisedDataset` (`json.load`, `image` joined to
  `--image_folder`); `llava-jsonl`: the same records, one per line (LLaVA-NeXT).
- `sharegpt`: LLaMA-Factory's sharegpt layout (`conversations` of `from`/`value`, `images` list), plus its
  entry in `dataset_info.json` beside the file.
- `messages`: the TRL / Hugging Face chat format: `messages` of `role`/`content`, content as typed parts
  (`{"type": "image"}`, `{"type": "text", "text": ...}`), and an `images` column.

Every consumer asserts or silently mishandles the same things, so each record is checked against all of
them before it is written; a record that breaks one goes to the rejects file with its reasons, never to
the export.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from cogalign.errors import CogalignError
from cogalign.hub.output import check_complete, count_records, image_path, images_of, inserted_turns, iter_layout
from cogalign.layout import read_manifest
from cogalign.records import loads_exact as loads
from cogalign.writer import dumps
from cogalign.progress import Progress

FORMATS = ("llava-json", "llava-jsonl", "sharegpt", "messages")
IMAGE = "<image>"
ROLES = {"human": "user", "gpt": "assistant"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}

#: reason code -> what breaks (the rejects file and the README list these)
RULES = {
    "not_an_object": "the record is not a JSON object",
    "conversations_missing": "no conversations list, or an empty one",
    "roles_not_alternating": "turns are not human, gpt, human, gpt, ... ending with gpt",
    "empty_value": "a turn's value is empty, blank or not a string",
    "image_count_mismatch": "the number of <image> tokens differs from the number of images",
    "image_in_inserted_turn": "a turn cogalign inserted holds <image>",
    "provenance_mismatch": "cogalign.turns does not match the conversation",
    "image_without_path": "an image has no path (embedded bytes only)",
    "image_file_missing": "with --image-folder: an image is not a file under the image root (an input with "
                          "embedded images has no files: the trainer would fail on it)",
}


@dataclass
class ExportResult:
    path: Path
    rejects_path: Path
    written: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    dataset_info: Path | None = None


def check_record(record: dict) -> list[str]:
    """The rules every consumer needs; [] when the record is fine, else the reason codes it breaks."""
    if not isinstance(record, dict):
        return ["not_an_object"]
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        return ["conversations_missing"]
    reasons = []
    roles = [t.get("from") if isinstance(t, dict) else None for t in conv]
    if len(conv) % 2 or any(role != ("human" if i % 2 == 0 else "gpt") for i, role in enumerate(roles)):
        reasons.append("roles_not_alternating")
    values = [t.get("value") if isinstance(t, dict) else None for t in conv]
    if any(not isinstance(v, str) or not v.strip() for v in values):
        reasons.append("empty_value")
    texts = [v if isinstance(v, str) else "" for v in values]
    images = images_of(record)
    if sum(v.count(IMAGE) for v in texts) != len(images):
        reasons.append("image_count_mismatch")
    if any(image_path(im) is None for im in images):
        reasons.append("image_without_path")
    try:
        inserted = inserted_turns(record)
    except (KeyError, TypeError, ValueError):
        inserted = None
    if inserted is None or any(i >= len(conv) or roles[i] != ("human" if i % 2 == 0 else "gpt") for i in inserted):
        reasons.append("provenance_mismatch")
    elif any(IMAGE in texts[i] for i in inserted):
        reasons.append("image_in_inserted_turn")
    return reasons


class ImagePaths:
    """Image paths as the trainer will see them: relative to `image_folder` when given, else unchanged."""

    def __init__(self, image_root: Path, image_folder: Path | None):
        self.root = Path(image_root).absolute()
        self.folder = Path(image_folder).absolute() if image_folder else None

    def __call__(self, image) -> str:
        path = image_path(image)
        if self.folder is None or os.path.isabs(path):
            return path if self.folder is None else os.path.relpath(path, self.folder)
        return Path(os.path.relpath(self.root / path, self.folder)).as_posix()


def _parts(text: str) -> list[dict]:
    """LLaVA text -> typed content parts: an image part where each <image> stood, text parts between."""
    parts = []
    for i, piece in enumerate(text.split(IMAGE)):
        if i:
            parts.append({"type": "image"})
            piece = piece.removeprefix("\n")
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts


def convert(record: dict, fmt: str, paths: ImagePaths) -> dict:
    """One checked LLaVA record in the export format."""
    images = [paths(im) for im in images_of(record)]
    conv = [{"from": t["from"], "value": t["value"]} for t in record["conversations"]]
    head = {"id": record["id"]} if "id" in record else {}
    if fmt in ("llava-json", "llava-jsonl"):
        if not images:
            return {**head, "conversations": conv}
        image = images if isinstance(record.get("image"), list) else images[0]
        return {**head, "image": image, "conversations": conv}
    if fmt == "sharegpt":
        return {**head, "conversations": conv, "images": images}
    if fmt == "messages":
        return {**head, "messages": [{"role": ROLES[t["from"]], "content": _parts(t["value"])} for t in conv],
                "images": images}
    raise CogalignError(f"--to {fmt!r}: unknown format; choose from {', '.join(FORMATS)}")


class _Writer:
    """JSON array or JSON lines, streamed to a temporary file and renamed into place when complete."""

    def __init__(self, path: Path, array: bool):
        self.path, self.array, self.first = path, array, True
        self.tmp = path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        if array:
            self.file.write(b"[")

    def write(self, obj) -> None:
        if self.array:
            self.file.write(b"\n" if self.first else b",\n")
        self.file.write(dumps(obj) + (b"" if self.array else b"\n"))
        self.first = False

    def close(self) -> None:
        if self.array:
            self.file.write(b"\n]\n" if not self.first else b"]\n")
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def is_array(fmt: str, dest: Path) -> bool:
    return fmt == "llava-json" or (fmt in ("sharegpt", "messages") and dest.suffix.lower() == ".json")


def default_image_root(out: Path) -> Path:
    """Where the shards' relative image paths live: the folder of the input `expand` read (its default root)."""
    manifest = read_manifest(out)
    return Path(manifest.get("image_root") or Path(manifest["input"]).parent)


def export(out: str | Path, fmt: str, dest: str | Path, image_root: str | Path | None = None,
           image_folder: str | Path | None = None, rejects: str | Path | None = None,
           progress: bool = True) -> ExportResult:
    """Write `dest` in `fmt`, record by record; rejects go to `rejects` (default: `<dest>.rejects.jsonl`)."""
    if fmt not in FORMATS:
        raise CogalignError(f"--to {fmt!r}: unknown format; choose from {', '.join(FORMATS)}")
    out, dest = Path(out), Path(dest)
    layout = check_complete(out)
    if dest.is_dir():
        raise CogalignError(f"--out {dest} is a folder; give a file path, e.g. {dest / (out.name + '.json')}")
    if dest.resolve().is_relative_to(out.resolve()):
        raise CogalignError(f"--out {dest}: give a file path outside the output folder {out} "
                            "(files there would be taken for part of the dataset)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "sharegpt":
        read_dataset_info(dest)  # refuse before anything is written
    root = Path(image_root) if image_root else default_image_root(out)
    if image_folder and not root.is_dir():
        raise CogalignError(f"image root {root} (where the output's image paths start) is not a folder here; "
                            "pass --image-root, the --image-root that `expand` used")
    paths = ImagePaths(root, image_folder)
    result = ExportResult(dest, Path(rejects) if rejects else dest.with_name(dest.name + ".rejects.jsonl"))
    writer, bad = _Writer(dest, is_array(fmt, dest)), _Writer(result.rejects_path, False)
    try:
        with Progress(count_records(out), progress, label="export") as bar:
            for index, record in enumerate(iter_layout(layout)):
                reasons = check_record(record)
                if not reasons and image_folder and not all(
                        (paths.root / image_path(im)).is_file() for im in images_of(record)):
                    reasons = ["image_file_missing"]
                if reasons:
                    rid = record.get("id") if isinstance(record, dict) else None
                    bad.write({"index": index, "id": rid, "reasons": reasons,
                               "detail": "; ".join(RULES[r] for r in reasons)})
                    result.rejected += 1
                    result.reasons.update(reasons)
                else:
                    writer.write(convert(record, fmt, paths))
                    result.written += 1
                bar.advance()
    except BaseException:
        writer.abort()
        bad.abort()
        raise
    writer.close()
    bad.close()
    if fmt == "sharegpt":
        result.dataset_info = register_sharegpt(dest)
    return result


def read_dataset_info(dest: Path) -> dict:
    """The `dataset_info.json` beside `dest` ({} if none); CogalignError if it is not a JSON object."""
    info_path = dest.parent / "dataset_info.json"
    try:
        info = loads(info_path.read_bytes()) if info_path.is_file() else {}
    except ValueError as e:
        raise CogalignError(f"{info_path}: not valid JSON ({str(e).splitlines()[0]}); fix it or move it away, "
                            "then rerun (the sharegpt export adds its entry there)") from None
    if not isinstance(info, dict):
        raise CogalignError(f"{info_path}: not a JSON object; LLaMA-Factory's dataset_info.json maps names to entries")
    return info


def register_sharegpt(dest: Path) -> Path:
    """Add (or replace) this file's entry in the `dataset_info.json` beside it; other entries are kept."""
    info_path = dest.parent / "dataset_info.json"
    info = read_dataset_info(dest)
    info[dest.stem] = {"file_name": dest.name, "formatting": "sharegpt",
                       "columns": {"messages": "conversations", "images": "images"}, "tags": dict(SHAREGPT_TAGS)}
    tmp = info_path.with_name(info_path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2))
    os.replace(tmp, info_path)
    return info_path
