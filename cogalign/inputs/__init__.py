"""Inputs beyond one LLaVA JSON/JSONL file, all streamed with each record's position:

- `parquet`: a `.parquet` file or a folder of them (Hub layout, embedded images);
- `disk`: a `datasets` `save_to_disk` folder;
- `mixture`: a LLaVA-NeXT YAML data mixture (`datasets: [{json_path, sampling_strategy}]`);
- `llava`: a JSON array or JSONL file (`cogalign.records`).

`records.iter_records` / `count_records` hand the first three to `iter_input` /
`count_input`. `input_files` lists the files an input consists of (for its identity).
Records whose turns are `{role, content}` or that hold `messages` are converted to LLaVA
`{from, value}` in the worker (`turns.to_llava`) and counted in the report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from cogalign.errors import InputError
from cogalign.inputs import arrow, mixture

__all__ = ["input_kind", "iter_input", "count_input", "input_files", "default_image_root"]


def default_image_root(path) -> Path:
    """Where relative `image` paths resolve by default: the input file's folder, or the input folder."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def image_root(input_path, given=None) -> Path:
    """`--image-root` if given (it must be a folder: a typo would reject every record as missing),
    else `default_image_root(input_path)`."""
    if given is None or str(given) == "":
        return default_image_root(input_path)
    root = Path(given)
    if not root.is_dir():
        raise InputError(f"--image-root {root}: {'a file' if root.exists() else 'no such folder'}; give the folder "
                         "that the records' `image` paths are relative to (default: the input's folder)")
    return root


def input_kind(path) -> str:
    """`llava`, `parquet`, `disk` or `mixture`, from the path alone."""
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


def _files(path: Path, kind: str) -> list[Path]:
    return arrow.parquet_files(path) if kind == "parquet" else arrow.disk_files(path)


def iter_input(path, *, skip: Callable[[int], bool] | None = None, seed: int = 0) -> Iterator[tuple[int, object]]:
    path = Path(path)
    kind = input_kind(path)
    if kind == "mixture":
        return mixture.iter_mixture(path, seed, _count_one, _iter_one, skip)
    return arrow.iter_arrow(_files(path, kind), kind, skip)


def count_input(path, *, seed: int = 0) -> int:
    path = Path(path)
    kind = input_kind(path)
    if kind == "mixture":
        return mixture.count_mixture(path, seed, _count_one)
    return arrow.count_arrow(_files(path, kind), kind)


def input_files(path) -> list[Path]:
    """Every file the input's records come from (the YAML itself included), in reading order."""
    path = Path(path)
    kind = input_kind(path)
    if kind == "llava":
        return [path]
    if kind == "mixture":
        return mixture.mixture_files(path, input_files)
    files = _files(path, kind)
    return files + ([path / "state.json"] if kind == "disk" and (path / "state.json").is_file() else [])


def _count_one(path: Path) -> int:
    from cogalign.records import count_records

    return count_records(path)


def _iter_one(path: Path, skip) -> Iterator[tuple[int, object]]:
    from cogalign.records import iter_records

    return iter_records(path, skip=skip)
