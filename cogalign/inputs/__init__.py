"""Inputs beyond one LLaVA JSON/JSONL file, all streamed with each record's position:

- `parquet`: a `.parquet` file, a folder of them (Hub layout, embedded images; one config and
  split of it, `splits`), or a Hub dataset `hf://datasets/OWNER/NAME[@REV][/PATH]` (`hub`);
- `disk`: a `datasets` `save_to_disk` folder;
- `mixture`: a LLaVA-NeXT YAML data mixture (`datasets: [{json_path, sampling_strategy}]`);
- `llava`: a JSON array or JSONL file (`cogalign.inputs.records`).

`resolve_input` turns what the user gave (with `--config`/`--split`) into what is read: a
`DatasetInput` for a parquet folder or Hub dataset, else the path. `iter_input` / `count_input`
read every kind (LLaVA files through `records.iter_records` / `count_records`). `input_files` lists
the files an input consists of and `hash_input` hashes them (a Hub input: its commit and file
names, which pin the bytes), for its identity.
Records whose turns are `{role, content}` or that hold `messages` are converted to LLaVA
`{from, value}` in the worker (`turns.to_llava`) and counted in the report.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from cogalign.inputs import records
from cogalign.errors import InputError
from cogalign.inputs import arrow, hub, mixture
from cogalign.inputs.splits import DatasetInput, local_folder

__all__ = ["input_kind", "iter_input", "count_input", "input_files", "hash_input", "default_image_root",
           "resolve_input", "reopen_input", "image_root", "DatasetInput"]


def resolve_input(spec, config: str | None = None, split: str | None = None):
    """A `DatasetInput` for a parquet folder or `hf://datasets/...` (one config and split, by `datasets`'
    rules), a split's folder of a `save_to_disk` DatasetDict, else the path as it is."""
    if isinstance(spec, DatasetInput):
        return spec
    if hub.is_hub_input(spec):
        return hub.resolve(spec, config, split)
    path = Path(spec)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    kind = input_kind(path)
    if kind == "parquet" and path.is_dir():
        return local_folder(path, config, split)
    if kind == "disk" and split is not None and config is None and (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise InputError(f"{path}: no split {split!r}; it has {', '.join(splits) or 'none'}; pick one with --split")
        return path / split
    if config is not None or split is not None:
        raise InputError(f"{path}: --config/--split choose among the files of a parquet folder, a save_to_disk "
                         "DatasetDict (--split) or an hf://datasets/... input; leave them out for this input")
    return path


def reopen_input(manifest: dict, path):
    """The input a run read, for re-reading its records by position: a Hub dataset at the recorded
    commit, a parquet folder with the recorded config and split; else `path` as it is."""
    ident = manifest.get("input_identity") or {}
    if ident.get("commit"):
        ds = hub.parse(str(manifest.get("input") or ident["path"]))
        pinned = str(hub.DatasetSpec(ds.repo_id, ident["commit"], ds.path))
        one_file = ds.path.endswith(".parquet")
        return hub.resolve(pinned, None if one_file else ident.get("config"), None if one_file else ident.get("split"))
    if ident.get("split") is not None and Path(path).is_dir() and input_kind(path) == "parquet":
        return local_folder(Path(path), ident.get("config"), ident.get("split"))
    return path


def default_image_root(path) -> Path:
    """Where relative `image` paths resolve by default: the input file's folder, or the input folder
    (a Hub dataset: its snapshot folder in the cache)."""
    if isinstance(path, DatasetInput):
        return path.root
    p = Path(path)
    return p if p.is_dir() else p.parent


def image_root(input_path, given=None) -> Path:
    """`--image-root` if given (it must be a folder: a typo would reject every record as missing),
    else `default_image_root(input_path)`."""
    default = default_image_root(input_path)
    if given is None or str(given) == "" or Path(given) == default:  # a Hub snapshot folder appears as files download
        return default
    root = Path(given)
    if not root.is_dir():
        raise InputError(f"--image-root {root}: {'a file' if root.exists() else 'no such folder'}; give the folder "
                         "that the records' `image` paths are relative to (default: the input's folder)")
    return root


def input_kind(path) -> str:
    """`llava`, `parquet`, `disk` or `mixture`, from the path alone."""
    if isinstance(path, DatasetInput) or hub.is_hub_input(path):
        return "parquet"
    p = Path(path)
    if p.is_dir():
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return "disk"
        if any(f.suffix == ".parquet" for f in p.rglob("*.parquet")):
            return "parquet"
        raise InputError(f"{p}: a folder with neither .parquet files nor a datasets save_to_disk "
                         "(state.json); pass a LLaVA .json/.jsonl file, parquet files or a save_to_disk folder")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".yaml", ".yml"):
        return "mixture"
    return "llava"


def _files(path, kind: str) -> list:
    if kind != "parquet":
        return arrow.disk_files(path)
    path = resolve_input(path)
    return list(path.files) if isinstance(path, DatasetInput) else [path]


def iter_input(path, *, skip: Callable[[int], bool] | None = None, seed: int = 0) -> Iterator[tuple[int, object]]:
    """`(position, record)` for every record of any input (see `records.iter_records` for LLaVA
    files); `skip(position)` true: counted, not yielded; `seed`: a YAML mixture's random sampling."""
    kind = input_kind(path)
    if kind == "llava":
        return records.iter_records(path, skip=skip)
    if kind == "mixture":
        return mixture.iter_mixture(Path(path), seed, _count_one, _iter_one, skip)
    return arrow.iter_arrow(_files(path, kind), kind, skip)


def count_input(path, digest=None, *, seed: int = 0) -> int:
    """The positions `iter_input` walks. `digest` (a hashlib object), if given, is fed the input's
    bytes (a LLaVA file as the count streams it, other kinds file by file): its identity for resume."""
    kind = input_kind(path)
    if kind == "llava":
        return records.count_records(path, digest)
    if kind == "mixture":
        n = mixture.count_mixture(Path(path), seed, _count_one)
    else:
        n = arrow.count_arrow(_files(path, kind), kind)
    if digest is not None:
        hash_input(path, digest)
    return n


def input_files(path) -> list:
    """Every file the input's records come from (the YAML itself included), in reading order
    (`hub.HubFile`s for a Hub dataset: not downloaded by listing them)."""
    kind = input_kind(path)
    if kind == "parquet":
        return _files(path, kind)
    path = Path(path)
    if kind == "llava":
        return [path]
    if kind == "mixture":
        return mixture.mixture_files(path, input_files)
    files = _files(path, kind)
    return files + ([path / "state.json"] if kind == "disk" and (path / "state.json").is_file() else [])


def hash_input(path, digest) -> None:
    """Feed `digest` the input's bytes, file by file; a Hub dataset, whose commit pins its bytes: the
    repo, commit, config, split and file names (nothing is downloaded for it)."""
    source = resolve_input(path) if input_kind(path) == "parquet" else path
    if isinstance(source, DatasetInput) and source.hub:
        pin = {**source.hub, "config": source.config, "split": source.split, "files": [f.name for f in source.files]}
        digest.update(json.dumps(pin, sort_keys=True).encode())
        return
    for file in input_files(source):
        with open(file, "rb") as f:
            records.HashingReader(f, digest).drain()


def _count_one(path: Path) -> int:
    return records.count_records(path)


def _iter_one(path: Path, skip) -> Iterator[tuple[int, object]]:
    return records.iter_records(path, skip=skip)
