"""Which parquet files make one config and one split of a dataset folder or Hub repo, by the
rules of `datasets.load_dataset`:

- the card's (`README.md` YAML) `configs:` list, when there is one: `--config` names one
  (default: the one marked `default: true`, else the one named `default`, else the only one),
  and its `data_files` map splits to patterns (`data_dir` is a prefix);
- otherwise `datasets`' own default patterns, tried in its order: `data/{split}-00000-of-00001.*`
  shards, then split names in folder names (`train/`, `test/`...), then in file names
  (`*train*`, `*test*`, `*validation*`...), then every file as `train`.

`--split` picks one split (default: `train`, else the only split). Only `.parquet` files count;
paths under a folder starting with `.` or `_` are skipped. A folder whose parquet files do not
all belong to a split (`data/train-*.parquet` beside `extra.parquet`), or that has several
splits and no `train`, is refused unless `--split` names one: nothing is merged or dropped silently.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cogalign.errors import InputError

__all__ = ["DatasetInput", "local_folder", "choose", "missing_shards", "fnmatch_glob", "DEFAULT_SPLIT"]

DEFAULT_SPLIT = "train"


@dataclass(frozen=True)
class DatasetInput:
    """One config and split of a parquet folder or Hub dataset: the files, in reading order."""

    label: str  # the input as given (a folder, or hf://datasets/...)
    config: str
    split: str
    files: tuple  # Paths, or `hub.HubFile`s (downloaded when read)
    root: Path  # where relative `image` paths resolve by default
    hub: dict | None = None  # {repo, revision, commit} of an hf://datasets input

    def __str__(self) -> str:
        return self.label


def local_folder(folder: Path, config: str | None = None, split: str | None = None) -> DatasetInput:
    """A local parquet folder by the same rules (its `README.md` card's `configs` included); cogalign
    output folders inside it (holding `cogalign.json`) are not input."""
    from huggingface_hub.repocard import metadata_load

    outputs = [d.parent for d in folder.rglob("cogalign.json")]
    names = [f.relative_to(folder).as_posix() for f in folder.rglob("*.parquet")
             if f.is_file() and not any(o in f.parents for o in outputs)]
    card = folder / "README.md"
    try:
        meta = metadata_load(card) if card.is_file() else None
    except Exception as exc:  # yaml's errors, undecodable text
        raise InputError(f"{card}: the card's YAML is not readable ({' '.join(str(exc).split())[:160]})") from None
    config, split, chosen = choose(names, meta, config, split, str(folder))
    missing_shards(chosen, split, str(folder), "copy the missing files in, or give the files you have as the input (one file, or a YAML mixture of them)")
    return DatasetInput(str(folder), config, split, tuple(folder / n for n in chosen), folder)


def _matcher(files: list[str]):
    """A `datasets` pattern resolver over a list of repo-relative paths (fsspec glob semantics)."""
    from fsspec.utils import glob_translate

    def resolve(pattern: str) -> list[str]:
        rx = re.compile(glob_translate(pattern.lstrip("/")))
        found = [f for f in files if rx.match(f)]
        if not found:
            raise FileNotFoundError(pattern)
        return found

    return resolve


def _default_patterns(files: list[str]) -> dict[str, list[str]]:
    from datasets.data_files import _get_data_files_patterns  # the rules load_dataset applies

    try:
        return {str(split): patterns for split, patterns in _get_data_files_patterns(_matcher(files)).items()}
    except FileNotFoundError:
        return {}


def _configs(card: dict | None) -> dict[str, dict]:
    items = (card or {}).get("configs")
    if not isinstance(items, list):
        return {}
    return {str(c.get("config_name", "default")): c for c in items if isinstance(c, dict)}


def _config_patterns(entry: dict) -> dict[str, list[str]]:
    from datasets.data_files import sanitize_patterns

    prefix = str(entry.get("data_dir") or "").strip("/")
    data_files = entry.get("data_files")
    if data_files is None:
        return {}  # data_dir alone: the default patterns under it (handled by the caller)
    patterns = sanitize_patterns(data_files)
    return {str(split): [f"{prefix}/{p}" if prefix else p for p in pats] for split, pats in patterns.items()}


def _pick(names: list[str], given: str | None, what: str, where: str, option: str) -> str:
    if given is not None:
        if given not in names:
            raise InputError(f"{where}: no {what} {given!r}; it has {', '.join(names) or 'none'}; pick one with {option}")
        return given
    if DEFAULT_SPLIT in names and what == "split":
        return DEFAULT_SPLIT
    if len(names) == 1:
        return names[0]
    raise InputError(f"{where}: {len(names)} {what}s ({', '.join(names)}) and no {'train split' if what == 'split' else 'default config'}; "
                     f"pick one with {option} (nothing is merged)")


def _pick_config(configs: dict[str, dict], given: str | None, where: str) -> str:
    if given is None:
        marked = [name for name, c in configs.items() if c.get("default")]
        if marked:
            return marked[0]
        if "default" in configs:
            return "default"
    return _pick(list(configs), given, "config", where, "--config")


def choose(files: list[str], card: dict | None, config: str | None, split: str | None,
           where: str) -> tuple[str, str, list[str]]:
    """(config, split, the split's parquet files in reading order) from repo-relative paths."""
    files = sorted(f for f in files if f.endswith(".parquet")
                   and not any(part.startswith((".", "_")) for part in f.split("/")))
    if not files:
        raise InputError(f"{where}: no .parquet files; cogalign reads the parquet files of a dataset "
                         "(a repo without them: download it and pass its JSON files)")
    configs = _configs(card)
    if configs:
        name = _pick_config(configs, config, where)
        entry = configs[name]
        patterns = _config_patterns(entry)
        if not patterns:
            prefix = str(entry.get("data_dir") or "").strip("/") + "/"
            below = [f[len(prefix):] for f in files if f.startswith(prefix)]
            patterns = {s: [prefix + p for p in ps] for s, ps in _default_patterns(below).items()}
    else:
        if config not in (None, "default"):
            raise InputError(f"{where}: no config {config!r}; its card lists no `configs`, so the only config "
                             "is 'default'; leave out --config")
        name, patterns = "default", _default_patterns(files)
    chosen_split = _pick(list(patterns), split, "split", where, "--split")
    chosen: list[str] = []
    for pattern in patterns[chosen_split]:
        chosen += [f for f in files if f not in chosen and fnmatch_glob(pattern, f)]
    if not chosen:
        raise InputError(f"{where}: split {chosen_split!r} of config {name!r} has no .parquet files "
                         f"(patterns {', '.join(patterns[chosen_split])})")
    if not configs and split is None:
        claimed = {f for pats in patterns.values() for p in pats for f in files if fnmatch_glob(p, f)}
        stray = [f for f in files if f not in claimed]
        if stray:
            raise InputError(f"{where}: {len(stray)} parquet file{'s' * (len(stray) > 1)} ({stray[0]}"
                             f"{', ...' if len(stray) > 1 else ''}) belong{'s' * (len(stray) == 1)} to no split of {', '.join(patterns)}; "
                             "name the split with --split, or move the other files out")
    return name, chosen_split, chosen


_SHARD = re.compile(r"^(.*)-(\d{5})-of-(\d{5})(\.[^/]*)$")  # datasets' shard names: train-00000-of-00002.parquet


def missing_shards(names: list[str], split: str, where: str, fix: str) -> None:
    """Refuse a split whose shard names (`-00000-of-00002`) say that some of its files are not there,
    instead of reading part of it."""
    groups: dict[tuple, set[int]] = {}
    for name in names:
        m = _SHARD.match(name)
        if m:
            groups.setdefault((m.group(1), int(m.group(3)), m.group(4)), set()).add(int(m.group(2)))
    for (stem, total, ext), have in groups.items():
        if len(have) < total:
            missing = next(i for i in range(total) if i not in have)
            raise InputError(f"{where}: {len(have)} of the {total} files of split {split!r} are here "
                             f"({stem}-{missing:05d}-of-{total:05d}{ext} is missing); {fix}")


def fnmatch_glob(pattern: str, path: str) -> bool:
    """True when repo path `path` matches the Hub's split `pattern` (fsspec's glob rules, `**` included)."""
    from fsspec.utils import glob_translate

    return re.match(glob_translate(pattern.lstrip("/")), path) is not None
