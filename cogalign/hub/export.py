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

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from cogalign.errors import CogalignError
from cogalign.hub.output import check_complete, count_records, image_path, images_of, inserted_turns, iter_layout
from cogalign.expand.layout import read_manifest
from cogalign.inputs.records import loads_exact as loads
from cogalign.expand.writer import dumps, temp_name, write_atomic
from cogalign.expand.progress import Progress

__all__ = ["export", "ExportResult", "convert", "check_record", "check_dest", "ImagePaths", "ImageFiles", "is_array",
           "is_run_input", "default_image_root", "read_dataset_info", "check_entry", "register_sharegpt", "FORMATS",
           "RULES", "ROLES", "SHAREGPT_TAGS", "EXTENSIONS", "IMAGE", "MARKER"]

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
    "image_file_missing": "an image is not a file under the image root (an input with embedded images has no "
                          "files: the trainer would fail on it); run `expand --embed-images` to keep the images",
    "image_embedded_only": "an image exists only as bytes in the output (--embed-images): pass --image-folder "
                           "to have them written there as files",
}
#: the extensions each format may be written to (the trainers pick the reader by the extension)
EXTENSIONS = {"llava-json": (".json",), "llava-jsonl": (".jsonl",), "sharegpt": (".json", ".jsonl"),
              "messages": (".json", ".jsonl")}
#: a dataset_info.json entry that export wrote carries this key (LLaMA-Factory ignores unknown keys)
MARKER = "cogalign_export"


@dataclass
class ExportResult:
    """What `export` wrote: the output file and its rejects file, records written and rejected (by reason),
    `dataset_info.json`, image files written, whether a system prompt is in it."""
    path: Path
    rejects_path: Path
    written: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    dataset_info: Path | None = None
    images_written: int = 0
    system: bool = False  # a written record holds a `system` prompt


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
    pieces = text.split(IMAGE)
    for i, piece in enumerate(pieces):
        if i:
            parts.append({"type": "image"})
            piece = piece.removeprefix("\n")
        if i < len(pieces) - 1:
            piece = piece.removesuffix("\n")  # "text\n<image>": the importer joins parts with newlines
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts


def convert(record: dict, fmt: str, paths: ImagePaths, image_paths: list[str] | None = None,
            keep_keys: bool = True) -> dict:
    """One checked LLaVA record in the export format; `image_paths` replace the record's own (images
    written out from their bytes). With `keep_keys`, the record's other keys (`data_source`, the `cogalign`
    provenance, ...) follow the format's own."""
    images = image_paths if image_paths is not None else [paths(im) for im in images_of(record)]
    conv = [{"from": t["from"], "value": t["value"]} for t in record["conversations"]]
    head = {"id": record["id"]} if "id" in record else {}
    own = {"id", "image", "conversations"} | ({"images", "messages"} if fmt in ("sharegpt", "messages") else set())
    system = record.get("system") if isinstance(record.get("system"), str) and record["system"].strip() else None
    if fmt in ("messages", "sharegpt") and system is not None:  # a key of the format's own (sharegpt's `system`
        own.add("system")  # column; TRL reads `messages` alone): kept with --drop-keys too
    rest = {k: v for k, v in record.items() if k not in own} if keep_keys else {}
    if fmt in ("llava-json", "llava-jsonl"):
        if not images:
            return {**head, "conversations": conv, **rest}
        image = images if isinstance(record.get("image"), list) else images[0]
        return {**head, "image": image, "conversations": conv, **rest}
    if fmt == "sharegpt":
        return {**head, "conversations": conv, "images": images, **({"system": system} if system else {}), **rest}
    if fmt == "messages":
        lead = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system is not None else []
        return {**head, "messages": lead + [{"role": ROLES[t["from"]], "content": _parts(t["value"])} for t in conv],
                "images": images, **rest}
    raise CogalignError(f"--to {fmt!r}: unknown format; choose from {', '.join(FORMATS)}")


class _Writer:
    """JSON array or JSON lines, streamed to a temporary file and renamed into place when complete."""

    def __init__(self, path: Path, array: bool):
        self.path, self.array, self.first = path, array, True
        self.tmp = temp_name(path)  # a name of its own: never a file of the user's
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


def is_array(dest: Path) -> bool:
    """True when `dest` is one JSON array (`.json`); else it is JSON lines."""
    return dest.suffix.lower() == ".json"


def default_image_root(out: Path) -> Path:
    """Where the shards' relative image paths live: the folder of the input `expand` read (its default root)."""
    manifest = read_manifest(out)
    return Path(manifest.get("image_root") or Path(manifest["input"]).parent)


def _input_files(manifest: dict) -> list[Path]:
    """The files the run read, as far as they can be found from here (resolved)."""
    from cogalign.inputs import input_files

    identity = manifest.get("input_identity") if isinstance(manifest.get("input_identity"), dict) else {}
    hub = bool(identity.get("repo"))  # a Hub dataset: its files are names in the Hub cache, not paths here
    found = [] if hub else [Path(f) for f in identity.get("files", []) if isinstance(f, str)]
    for name in (manifest.get("input"), identity.get("path")):
        if isinstance(name, str) and "://" not in name:
            try:
                found += input_files(name)
            except Exception:  # moved, or not readable here: the content check below still holds
                found.append(Path(name))
    return [f.resolve() for f in found]


def is_run_input(path: Path, manifest: dict) -> bool:
    """Is `path` (an existing file) one the run read: the same path, or the same bytes as the input file."""
    real = path.resolve()
    if any(real == f for f in _input_files(manifest)):
        return True
    identity = manifest.get("input_identity") if isinstance(manifest.get("input_identity"), dict) else {}
    if identity.get("size") != path.stat().st_size or not identity.get("sha256"):
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == identity["sha256"]


def check_dest(out: Path, fmt: str, dest: Path, rejects: Path, overwrite: bool) -> None:
    """Refuse, before anything is written, a file export may not write: a wrong extension for the
    format, dataset_info.json, the run's input, or any existing file without --overwrite."""
    if dest.is_dir():
        raise CogalignError(f"--out {dest} is a folder; give a file path, e.g. {dest / (out.name + '.json')}")
    if dest.suffix.lower() not in EXTENSIONS[fmt]:
        want = " or ".join(EXTENSIONS[fmt])
        raise CogalignError(f"--out {dest}: --to {fmt} writes {want} files (trainers pick the reader by the "
                            f"extension); name it {dest.with_suffix(EXTENSIONS[fmt][0]).name}"
                            + (", or use --to llava-jsonl" if fmt == "llava-json" else
                               ", or use --to llava-json" if fmt == "llava-jsonl" else ""))
    for path, option in ((dest, "--out"), (rejects, "--rejects")):
        if path.resolve().is_relative_to(out.resolve()):
            raise CogalignError(f"{option} {path}: give a file path outside the output folder {out} "
                                "(files there would be taken for part of the dataset)")
    manifest = read_manifest(out)
    for path, option in ((dest, "--out"), (rejects, "--rejects")):
        if path.name == "dataset_info.json":
            raise CogalignError(f"{option} {path}: that is LLaMA-Factory's dataset list, which export only adds "
                                "entries to; name the export file otherwise, e.g. " + str(path.with_name("data.json")))
        if path.is_dir():
            raise CogalignError(f"{option} {path} is a folder; give a file path")
        if path.exists() and is_run_input(path, manifest):
            raise CogalignError(f"{option} {path}: that is the input the run {out} read; export never replaces "
                                "it (the run could not resume): choose another file")
        if path.exists() and not overwrite:
            raise CogalignError(f"{option} {path}: exists; export replaces a file only with --overwrite, "
                                "or choose another name")
        if path.exists() and not _text(path):
            raise CogalignError(f"{option} {path}: exists and is a binary file (an image?), so no export "
                                "wrote it; export never replaces it, --overwrite or not: choose another name")
    if rejects.resolve() == dest.resolve():
        raise CogalignError(f"--rejects {rejects}: the same file as --out; choose another")


def _text(path: Path) -> bool:
    """Could export have written this file: UTF-8 text without NUL bytes (export writes JSON; an image,
    an archive or any other binary file is never one of its)?"""
    with open(path, "rb") as f:
        head = f.read(4096)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not a character cut at the end of the block
            return False
    return b"\0" not in head


class ImageFiles:
    """Images that exist only as bytes in the output, written as files under `<image_folder>/<stem>-images/`:
    a folder export creates and marks (`.cogalign-export`); an existing one is written into only when it
    carries that mark and --overwrite is given, so no file of someone else's is ever replaced."""

    MARK = ".cogalign-export"

    def __init__(self, image_folder: Path, stem: str, overwrite: bool):
        self.folder = image_folder / f"{stem}-images"
        self.existed, self.overwrite = self.folder.exists(), overwrite
        self.written = 0

    def write(self, index: int, k: int, name: str, data: bytes) -> str:
        """Write image `k` of record `index` (embedded bytes) into the marked folder; returns its path relative
        to the export's folder."""
        if self.existed and not (self.folder / self.MARK).is_file():
            raise CogalignError(f"{self.folder}: exists and was not made by cogalign export, which would write the "
                                "output's embedded images there; remove or rename that folder, or name --out otherwise")
        if self.existed and not self.overwrite:
            raise CogalignError(f"{self.folder}: exists, and export would write the output's embedded images "
                                "there; pass --overwrite, or remove that folder")
        if not self.existed and not self.written:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / self.MARK).write_text("images written by `cogalign export`; rerun with --overwrite replaces them\n")
        path = self.folder / f"{index:08d}-{k}{_extension(name, data)}"
        write_atomic(path, data)
        self.written += 1
        return f"{self.folder.name}/{path.name}"


def _extension(name: str, data: bytes) -> str:
    suffix = Path(name).suffix.lower()
    if suffix in (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"):
        return suffix
    from io import BytesIO

    from PIL import Image

    try:
        return "." + (Image.open(BytesIO(data)).format or "img").lower().replace("jpeg", "jpg")
    except Exception:
        return ".img"


def export(out: str | Path, fmt: str, dest: str | Path, image_root: str | Path | None = None,
           image_folder: str | Path | None = None, rejects: str | Path | None = None,
           progress: bool = True, overwrite: bool = False, keep_keys: bool = True) -> ExportResult:
    """Write `dest` in `fmt`, record by record; rejects go to `rejects` (default: `<dest>.rejects.jsonl`).
    Every image path written is a file under the image root (or `image_folder`): an image that is not is
    written out from the output's bytes (an --embed-images run, with `image_folder`) or rejected."""
    if fmt not in FORMATS:
        raise CogalignError(f"--to {fmt!r}: unknown format; choose from {', '.join(FORMATS)}")
    out, dest = Path(out), Path(dest)
    layout = check_complete(out)
    result = ExportResult(dest, Path(rejects) if rejects else dest.with_name(dest.name + ".rejects.jsonl"))
    check_dest(out, fmt, dest, result.rejects_path, overwrite)
    if image_folder is not None and not Path(image_folder).is_dir():
        raise CogalignError(f"--image-folder {image_folder}: no such folder; give the folder the trainer joins "
                            "image paths to (LLaVA --image_folder, LLaMA-Factory media_dir)")
    if fmt == "sharegpt":
        check_entry(dest)  # refuse before anything is written
    root = Path(image_root) if image_root else default_image_root(out)
    embedded = bool(read_manifest(out).get("options", {}).get("embed_images"))
    if not root.is_dir() and not (embedded and image_folder):
        raise CogalignError(f"image root {root} (where the output's image paths start) is not a folder here; "
                            "pass --image-root, the --image-root that `expand` used")
    paths = ImagePaths(root, image_folder)
    files = ImageFiles(Path(image_folder), dest.stem, overwrite) if image_folder else None
    if files is not None and embedded and files.folder.resolve().is_relative_to(out.resolve()):
        raise CogalignError(f"--image-folder {image_folder}: export would write the output's images into "
                            f"{files.folder}, inside the output folder {out}; give a folder outside it")
    writer = _open_writer(dest, is_array(dest), "--out")
    try:
        bad = _open_writer(result.rejects_path, False, "--rejects")
    except CogalignError:
        writer.abort()
        raise
    try:
        with Progress(count_records(out), progress, label="export") as bar:
            for index, (record, data) in enumerate(iter_layout(layout, with_bytes=True)):
                reasons = check_record(record)
                written = None
                if not reasons:
                    reasons, written = _place_images(record, data, index, paths, files)
                if reasons:
                    rid = record.get("id") if isinstance(record, dict) else None
                    bad.write({"index": index, "id": rid, "reasons": reasons,
                               "detail": "; ".join(RULES[r] for r in reasons)})
                    result.rejected += 1
                    result.reasons.update(reasons)
                else:
                    writer.write(convert(record, fmt, paths, written, keep_keys))
                    result.written += 1
                    result.system = result.system or bool(isinstance(record.get("system"), str) and record["system"].strip())
                bar.advance()
    except BaseException as e:
        writer.abort()
        bad.abort()
        if isinstance(e, OSError):  # a full disk, a folder that went away: one line, nothing half-written
            raise CogalignError(f"--out {dest}: cannot write ({e.strerror or e}); nothing was written") from None
        raise
    try:
        writer.close()
        bad.close()
    except OSError as e:
        raise CogalignError(f"--out {dest}: cannot write ({e.strerror or e})") from None
    result.images_written = files.written if files else 0
    if fmt == "sharegpt":
        result.dataset_info = register_sharegpt(dest, result.system)
    return result


def _open_writer(path: Path, array: bool, option: str) -> _Writer:
    """A writer for `path`, its folder made; an --out/--rejects that cannot be written is one line."""
    above = next((q for q in path.parents if q.exists()), None)
    if above is not None and not above.is_dir():
        raise CogalignError(f"{option} {path}: {above} is a file, not a folder; choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _Writer(path, array)
    except OSError as e:
        raise CogalignError(f"{option} {path}: cannot write there ({e.strerror or e}); choose another path") from None


def _place_images(record: dict, data: list | None, index: int, paths: ImagePaths, files: ImageFiles | None):
    """(reasons, image paths to write or None): every image must be a file the trainer can open."""
    images = images_of(record)
    missing = [k for k, im in enumerate(images) if not (paths.root / image_path(im)).is_file()]
    if not missing:
        return [], None
    if data is None or len(data) != len(images) or any(data[k] is None for k in missing):
        return ["image_file_missing"], None
    if files is None:
        return ["image_embedded_only"], None
    return [], [files.write(index, k, image_path(im), data[k]) if k in missing else paths(im)
                for k, im in enumerate(images)]


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


def _entry(dest: Path, system: bool = False) -> dict:
    """The entry; with `system`, the `system` column is mapped (LLaMA-Factory ignores it otherwise)."""
    columns = {"messages": "conversations", "images": "images"} | ({"system": "system"} if system else {})
    return {"file_name": dest.name, "formatting": "sharegpt", "columns": columns, "tags": dict(SHAREGPT_TAGS), MARKER: True}


def check_entry(dest: Path) -> dict:
    """The `dataset_info.json` beside `dest`, after refusing to replace an entry of the same name
    that export did not write for this file."""
    info = read_dataset_info(dest)
    old = info.get(dest.stem)
    if old is not None and not (isinstance(old, dict) and old.get(MARKER) and old.get("file_name") == dest.name):
        where = f" (file_name: {old.get('file_name')})" if isinstance(old, dict) else ""
        raise CogalignError(f"{dest.parent / 'dataset_info.json'}: has an entry {dest.stem!r}{where} that cogalign "
                            "export did not write; name --out otherwise, or remove that entry yourself")
    return info


def register_sharegpt(dest: Path, system: bool = False) -> Path:
    """Add (or replace its own) entry for this file in the `dataset_info.json` beside it; other entries are kept."""
    info_path = dest.parent / "dataset_info.json"
    info = check_entry(dest)
    info[dest.stem] = _entry(dest, system)
    write_atomic(info_path, orjson.dumps(info, option=orjson.OPT_INDENT_2))
    return info_path
