"""LLaVA-NeXT YAML data mixtures: `datasets: [{json_path, sampling_strategy}]`.

`sampling_strategy` is `all` (default), `first:N`, `end:N` or `random:N`, where N may be
a count or a whole percentage (`random:10%`, rounded up), read as LLaVA-NeXT's `train.py` reads
them: `end:0` is its `[-0:]` (the whole file), `first: 3` is 3 (`int` strips spaces), and what
LLaVA-NeXT would stop on (`random:2.5%`) or silently take whole (`Random:5`, `first :3`, `all:5`)
is refused here. `random` picks its
records with `--seed` (and the entry's position in the list), uniformly without
replacement, and keeps them in file order (LLaVA's trainer shuffles anyway). Paths are
relative to the YAML file. The mixture's records are numbered in list order, then file
order; each entry may be any input cogalign reads except another YAML.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import yaml

from cogalign.errors import InputError

__all__ = ["Entry", "read_mixture", "selection", "plan", "iter_mixture", "count_mixture", "mixture_files"]


@dataclass(frozen=True)
class Entry:
    """One `datasets:` entry of a mixture: the input path and its sampling strategy (`all`, `first`, `end`,
    `random`) with the amount (`N` or `P%`)."""
    path: Path
    strategy: str  # all | first | end | random
    amount: str  # "", "N" or "P%"


def read_mixture(path: Path) -> list[Entry]:
    """The entries of a LLaVA-NeXT YAML mixture, paths resolved against its folder; a malformed file or strategy
    raises `InputError`."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{path}: not a readable YAML mixture ({' '.join(str(e).split())[:200]})") from None
    items = doc.get("datasets") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise InputError(f"{path}: expected `datasets:` with a list of {{json_path, sampling_strategy}} entries")
    entries = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("json_path"), str):
            raise InputError(f"{path}: datasets[{i}] has no `json_path` string")
        target = Path(item["json_path"]).expanduser()
        target = target if target.is_absolute() else path.parent / target
        if target.suffix.lower() in (".yaml", ".yml"):
            raise InputError(f"{path}: datasets[{i}] is another YAML mixture ({target}); nest the files instead")
        if not target.exists():
            raise InputError(f"{path}: datasets[{i}]: {target} does not exist (paths are relative to the YAML)")
        raw = str(item.get("sampling_strategy", "all"))
        entries.append(_entry(path, i, target, raw))
    return entries


def _entry(path: Path, i: int, target: Path, raw: str) -> Entry:
    if raw == "all":
        return Entry(target, "all", "")
    strategy, colon, amount = raw.partition(":")
    amount = amount.strip()  # LLaVA-NeXT's int() strips spaces; the name must match exactly
    number = amount[:-1] if amount.endswith("%") else amount
    if colon and strategy in ("first", "end", "random") and number.isdigit() and ":" not in amount \
            and (number == amount or int(number) <= 100):
        return Entry(target, strategy, amount)
    hint = ""
    if colon and strategy.strip().lower() in ("first", "end", "random") and strategy not in ("first", "end", "random"):
        hint = f" (LLaVA-NeXT matches {strategy.strip().lower()!r} exactly and would take the whole file)"
    elif "." in number:
        hint = " (LLaVA-NeXT reads the percentage with int() and stops on a fraction)"
    raise InputError(f"{path}: datasets[{i}]: sampling_strategy {raw!r}{hint}; expected all, first:N, end:N, "
                     "random:N or a whole percentage such as random:10%")


def _take(amount: str, total: int) -> int:
    if amount.endswith("%"):
        return min(total, math.ceil(float(amount[:-1]) * total / 100))
    return min(total, int(amount))


def selection(entry: Entry, index: int, total: int, seed: int) -> np.ndarray | range:
    """Positions (in the entry's own file) that the mixture takes, in file order."""
    if entry.strategy == "all":
        return range(total)
    n = _take(entry.amount, total)
    if entry.strategy == "first":
        return range(n)
    if entry.strategy == "end":
        return range(total - n if n else 0, total)  # LLaVA-NeXT's [-0:] is the whole file
    rng = np.random.default_rng([seed, index])
    return np.sort(rng.choice(total, size=n, replace=False))


def plan(path: Path, seed: int, count: Callable[[Path], int]) -> list[tuple[Entry, object]]:
    """Each entry with the positions it takes (`selection`), counting each file's records with `count`."""
    entries = read_mixture(path)
    return [(e, selection(e, i, count(e.path), seed)) for i, e in enumerate(entries)]


def iter_mixture(path: Path, seed: int, count, iterate, skip=None) -> Iterator[tuple[int, object]]:
    """`count(path)` and `iterate(path, skip)` read one entry's file."""
    offset = 0
    for entry, chosen in plan(path, seed, count):
        # position in the entry's file -> position in the mixture
        where = {int(p): offset + k for k, p in enumerate(chosen)} if not isinstance(chosen, range) else None
        start = chosen.start if isinstance(chosen, range) else 0

        def local_skip(p, where=where, start=start, chosen=chosen, offset=offset):
            if where is None:
                if p not in chosen:
                    return True
                mine = offset + p - start
            else:
                mine = where.get(p)
                if mine is None:
                    return True
            return skip is not None and skip(mine)

        for p, record in iterate(entry.path, local_skip):
            yield (offset + p - start) if where is None else where[p], record
        offset += len(chosen)


def count_mixture(path: Path, seed: int, count) -> int:
    """Records the mixture yields in total at `seed`."""
    return sum(len(chosen) for _, chosen in plan(path, seed, count))


def mixture_files(path: Path, files) -> list[Path]:
    """The YAML file and every file its entries read (`files` lists an entry's files)."""
    out = [path]
    for entry in read_mixture(path):
        out.extend(files(entry.path))
    return out
