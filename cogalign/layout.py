"""Where everything lives in an output folder, and the run manifest that resume checks.

```
OUT/cogalign.json                  run manifest: options, fingerprint, input, shard layout
OUT/data/train-00000-of-00012.parquet   (or .jsonl)   the shards, Hub layout
OUT/stats/shard-00000.json         completion marker + counts (written last)
OUT/stats/shard-00000.rejects.jsonl, shard-00000.ids.json
OUT/.partial/                      shards being written (moved into data/ when complete)
OUT/report.json, OUT/rejects.jsonl, OUT/README.md (dataset card)   written once all shards are done
```
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import orjson

from cogalign.errors import CogalignError
from cogalign.writer import shard_name, write_atomic

MANIFEST = "cogalign.json"


@dataclass(frozen=True)
class Layout:
    root: Path
    num_shards: int
    fmt: str = "parquet"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def stats_dir(self) -> Path:
        return self.root / "stats"

    def shard_path(self, i: int) -> Path:
        return self.data_dir / shard_name(i, self.num_shards, self.fmt)

    def stats_path(self, i: int) -> Path:
        return self.stats_dir / f"shard-{i:05d}.json"

    def rejects_path(self, i: int) -> Path:
        return self.stats_dir / f"shard-{i:05d}.rejects.jsonl"

    def ids_path(self, i: int) -> Path:
        return self.stats_dir / f"shard-{i:05d}.ids.json"

    def is_complete(self, i: int) -> bool:
        return self.stats_path(i).exists() and self.shard_path(i).exists()

    def make_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.stats_dir.mkdir(parents=True, exist_ok=True)


def clear_output(root: Path) -> None:
    """`--overwrite`: remove what cogalign wrote there, nothing else."""
    for name in ("data", "stats", ".partial"):
        shutil.rmtree(root / name, ignore_errors=True)
    for name in (MANIFEST, "report.json", "rejects.jsonl", "README.md"):
        (root / name).unlink(missing_ok=True)
    for merged in (*root.glob("*_cogalign.json"), *root.glob("*_cogalign.jsonl")):
        merged.unlink()


def check_or_write_manifest(root: Path, manifest: dict) -> None:
    """A resume must match the recorded run; a fresh folder gets the manifest."""
    path = root / MANIFEST
    if path.exists():
        try:
            old = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError:
            raise CogalignError(f"{path}: unreadable run manifest; pass --overwrite to start over") from None
        keys = ("fingerprint", "records", "shard_size", "num_shards", "format")
        diff = [k for k in keys if old.get(k) != manifest.get(k)]
        if diff:
            changed = _changed_options(old.get("options", {}), manifest["options"]) or diff
            raise CogalignError(
                f"{root} holds a run with different settings ({', '.join(changed)}); "
                "rerun with the same options to resume, pass --overwrite to start over, or choose another --out")
        return
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(path, orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


def _changed_options(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in ("vq", "templates")]


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise CogalignError(f"{root}: no {MANIFEST} here; is this a cogalign output folder?")
    return orjson.loads(path.read_bytes())
