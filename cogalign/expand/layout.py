"""The output folder: where everything lives, which files a run owns, and the run manifest.

```
OUT/cogalign.json                  run manifest: options, input identity, shard layout, the files cogalign owns
OUT/data/train-00000-of-00012.parquet   (or .jsonl)   the shards, Hub layout
OUT/stats/shard-00000.json         completion marker + counts (written last)
OUT/stats/shard-00000.rejects.jsonl, shard-00000.ids.json
OUT/.partial/                      shards being written (moved into data/ when complete)
OUT/report.json, OUT/rejects.jsonl, OUT/stats/card.md   written once all shards are done
OUT/README.md                      the dataset card, only while README.md is cogalign's (see `card_is_ours`)
```

Ownership: a run starts only in an empty (or new) folder or in one whose manifest it
matches, so every file the manifest names was written by cogalign. `--overwrite` and
`reset` delete exactly those files; anything else in the folder is never touched.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson

from cogalign.errors import CogalignError
from cogalign.expand.writer import shard_name, write_atomic

__all__ = ["Layout", "read_manifest", "owned_files", "owned_paths", "merged_name", "differences", "prepare", "check",
           "reset", "card_is_ours", "write_card", "MANIFEST", "CARD", "CARD_COPY", "RUN_KEYS"]

MANIFEST = "cogalign.json"
CARD = "README.md"
CARD_COPY = "stats/card.md"  # the card as last written: README.md is ours while it equals this
_MANIFEST_TMP = ".cogalign.json."  # prefix of a manifest being created


@dataclass(frozen=True)
class Layout:
    """Paths of one output folder: shards in data/, their `.partial/` files, and the per-shard stats markers."""
    root: Path
    num_shards: int
    fmt: str = "parquet"

    @property
    def data_dir(self) -> Path:
        """The folder of the published shards (`data/`)."""
        return self.root / "data"

    @property
    def stats_dir(self) -> Path:
        """The folder of the per-shard stats markers (`stats/`)."""
        return self.root / "stats"

    def shard_path(self, i: int) -> Path:
        """Published path of shard `i`."""
        return self.data_dir / shard_name(i, self.num_shards, self.fmt)

    def partial_path(self, i: int) -> Path:
        """Path of shard `i` while a worker writes it (under `.partial/`)."""
        return self.root / ".partial" / shard_name(i, self.num_shards, self.fmt)

    def stats_path(self, i: int) -> Path:
        """Completion marker of shard `i`: its counts, written after the shard is published."""
        return self.stats_dir / f"shard-{i:05d}.json"

    def rejects_path(self, i: int) -> Path:
        """The rejected records of shard `i` (JSON lines)."""
        return self.stats_dir / f"shard-{i:05d}.rejects.jsonl"

    def ids_path(self, i: int) -> Path:
        """The record ids of shard `i`."""
        return self.stats_dir / f"shard-{i:05d}.ids.json"

    def shard_files(self, i: int) -> list[Path]:
        """Every file shard `i` may leave behind; the marker first, so a deletion unmarks it first."""
        return [self.stats_path(i), self.shard_path(i), self.partial_path(i), self.rejects_path(i), self.ids_path(i)]

    def is_complete(self, i: int) -> bool:
        """True when shard `i` is published and has its stats marker (a resume skips it)."""
        return self.stats_path(i).exists() and self.shard_path(i).exists()

    def make_dirs(self) -> None:
        """Create `data/` and `stats/`."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.stats_dir.mkdir(parents=True, exist_ok=True)


def merged_name(input_path: str, fmt: str) -> str | None:
    """The one LLaVA file assembled for --format json/jsonl."""
    return f"{Path(input_path).stem}_cogalign.{fmt}" if fmt in ("json", "jsonl") else None


def owned_files(input_path: str, layout: Layout) -> dict:
    """What a run writes, as recorded in its manifest (`owns`)."""
    top = [MANIFEST, "report.json", "rejects.jsonl", CARD_COPY, merged_name(input_path, layout.fmt)]
    pattern = Layout(Path(""), layout.num_shards, layout.fmt)
    per_shard = [p.as_posix().replace("00000", "{shard:05d}", 1) for p in pattern.shard_files(0)]
    return {"files": [f for f in top if f], "per_shard": per_shard, "shards": layout.num_shards,
            "card": f"{CARD}, while it equals {CARD_COPY}"}


# ----------------------------------------------------------------------- the manifest

def _read(root: Path) -> dict | None:
    path = root / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise CogalignError(f"{root} is a file, not a folder: give an output folder (an empty or new one for "
                            "--out)") from None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise CogalignError(f"{path}: unreadable run manifest, so cogalign cannot tell which files there are its own; "
                            "choose another --out (or remove that folder yourself)") from None


def read_manifest(root: Path, run: bool = False) -> dict:
    """The manifest; `run`: it must describe a run (not a folder `cogalign reset` emptied)."""
    manifest = _read(Path(root))
    if manifest is None:
        raise CogalignError(f"{root}: no {MANIFEST} here; is this a cogalign output folder?")
    if run and manifest.get("reset"):
        raise CogalignError(f"{root}: was reset and holds no run yet")
    return manifest


def _dump(manifest: dict) -> bytes:
    return orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


def _create(root: Path, manifest: dict) -> bool:
    """Write the manifest unless one exists (atomic: concurrent slices agree on one). True if written."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_MANIFEST_TMP}{uuid.uuid4().hex}.tmp"
    tmp.write_bytes(_dump(manifest))
    try:
        os.link(tmp, root / MANIFEST)  # fails if it exists; never shows a half-written manifest
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: exclusive create instead
        try:
            with open(root / MANIFEST, "xb") as f:
                f.write(_dump(manifest))
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink()


def _foreign_entries(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(e.name for e in root.iterdir() if not e.name.startswith(_MANIFEST_TMP))


# What must match for a resume (and for slices to share a folder).
RUN_KEYS = ("fingerprint", "records", "shard_size", "num_shards", "format")


def _shown_identity(a: dict) -> str:
    pinned = f", commit {a['commit'][:12]}, split {a.get('split')}" if a.get("commit") else ""  # hf://datasets
    return f"{Path(a['path']).name}{pinned}, {a['size']} bytes, sha256 {a['sha256'][:12]}"


def differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two runs' manifests (empty: the same run)."""
    out = []
    a, b = old.get("input_identity") or {}, new["input_identity"]
    input_changed = (a.get("sha256"), a.get("size")) != (b["sha256"], b["size"])
    if input_changed:
        was = _shown_identity(a) if a else f"{old.get('input')}, not hashed (an older cogalign)"
        out.append(f"input: {was} -> {_shown_identity(b)}")
    if old.get("fingerprint") != new["fingerprint"]:
        o, n = old.get("options", {}), new["options"]
        out += [f"{k}: {o.get(k)!r} -> {n.get(k)!r}" for k in sorted(set(o) | set(n))
                if o.get(k) != n.get(k) and k not in ("vq", "templates")] or ["fingerprint"]
    derived = ("records", "num_shards") if input_changed else ()  # follow from the input
    out += [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in RUN_KEYS[1:] if old.get(k) != new[k] and k not in derived]
    return out


def prepare(root: Path, manifest: dict, *, overwrite: bool, sliced: bool, mine) -> str:
    """Make `root` this run's folder, or refuse; for the first rank of a launch only.

    - no manifest: the folder must be empty or new (else refused, also with --overwrite);
    - same run: resume; with --overwrite, delete the shards `mine(shard)` selects (and the merged
      outputs), never another slice's;
    - another run: refused; --overwrite resets the folder when this run is the whole job, while a
      slice is refused with the `cogalign reset` hint (other slices may hold or be writing work).
    Returns "new", "resume" or "overwrite"."""
    root = Path(root)
    old = _read(root)
    if old is None:
        foreign = _foreign_entries(root)
        if foreign and MANIFEST not in foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise CogalignError(f"--out {root} is not empty ({shown}) and holds no {MANIFEST}: it is not a cogalign "
                                "output, and cogalign never writes over or deletes files it did not write (with "
                                "--overwrite neither); choose an empty or new --out")
        if not foreign and _create(root, manifest):
            return "new"
        old = read_manifest(root)  # another slice made it a moment ago
    _refuse_files_in_the_way(root, manifest, old)
    if old.get("reset"):  # a folder `cogalign reset` emptied of cogalign's files (the user's stay)
        write_atomic(root / MANIFEST, _dump(manifest))
        old = read_manifest(root)  # a concurrent slice of another run would show here
    diff = differences(old, manifest)
    if not diff:
        if overwrite:
            layout = Layout(root, manifest["num_shards"], manifest["format"])
            # other slices may be writing: their folders stay (an emptied .partial/ or data/ removed
            # under them failed their next write with ENOENT)
            _delete(root, [p for s in range(layout.num_shards) if mine(s) for p in layout.shard_files(s)], keep_dirs=True)
            _delete_merged(root, old)
            return "overwrite"
        return "resume"
    if not overwrite:
        raise CogalignError(f"{root} holds a run with different settings or input ({'; '.join(diff)}); rerun with "
                            "the same ones to resume, pass --overwrite to start over, or choose another --out")
    if sliced:
        raise CogalignError(f"{root} holds a run with different settings or input ({'; '.join(diff)}); a slice's "
                            "--overwrite only redoes its own shards of the same run: once no slice is running, "
                            f"`cogalign reset {root}`, then start the slices again")
    reset(root, old, keep_manifest=False)
    if not _create(root, manifest):
        raise CogalignError(f"{root}: another run created a manifest while this one started over; "
                            "do not run two jobs into one --out")
    return "new"


def _refuse_files_in_the_way(root: Path, manifest: dict, old: dict) -> None:
    """A file where this run would write one it owns (the merged `<input>_cogalign.json`, report.json, ...)
    that the folder's run did not write is the user's: refuse before anything is deleted or written."""
    was = set(_owned_top(old, Layout(root, old.get("num_shards", 0), old.get("format", "parquet"))))
    for name in (manifest.get("owns") or {}).get("files", []):
        if name != MANIFEST and name not in was and (root / name).is_file():
            raise CogalignError(f"--out {root}: {name} is a file cogalign did not write, and this run writes one of "
                                "that name; cogalign never replaces files it did not write: move it away, or choose "
                                "another --out")


def check(root: Path, manifest: dict) -> None:
    """The other ranks: the folder must now hold exactly this run."""
    diff = differences(read_manifest(root), manifest)
    if diff:
        raise CogalignError(f"{root} holds a run with different settings or input ({'; '.join(diff)})")


# ----------------------------------------------------------------------- deleting what is ours

def owned_paths(root: Path, manifest: dict) -> list[Path]:
    """Every file `manifest` says cogalign wrote in `root` (that exists), the manifest last."""
    root = Path(root)
    layout = Layout(root, manifest["num_shards"], manifest["format"])
    top = _owned_top(manifest, layout)
    paths = [p for s in range(layout.num_shards) for p in layout.shard_files(s)]
    legacy_card = "owns" not in manifest and (root / "report.json").exists()  # older runs always wrote it then
    if card_is_ours(root) or legacy_card:
        paths.append(root / CARD)
    for name in top:  # and the temporary files of an interrupted write
        paths += [p for p in root.glob(name + ".*.tmp")] + [root / name]
    paths += list(root.glob(f"{_MANIFEST_TMP}*.tmp"))
    paths.sort(key=lambda p: p.name == MANIFEST)
    return [p for p in paths if p.is_file()]


def _owned_top(manifest: dict, layout: Layout) -> list[str]:
    """The top-level files `manifest` owns (derived for a manifest older than `owns`)."""
    return (manifest.get("owns") or owned_files(manifest.get("input", ""), layout))["files"]


def reset(root: Path, manifest: dict | None = None, keep_manifest: bool = True) -> int:
    """Delete what cogalign wrote in `root` (per its manifest); returns how many files. If files of
    others remain, a manifest that owns nothing is kept: the folder stays usable as a cogalign --out."""
    root = Path(root)
    manifest = manifest or read_manifest(root)
    paths = owned_paths(root, manifest)
    _delete(root, paths)
    if keep_manifest and root.is_dir() and any(root.iterdir()):
        stub = {"cogalign_version": manifest.get("cogalign_version"), "reset": True, "num_shards": 0,
                "format": manifest.get("format", "parquet"), "owns": {"files": [MANIFEST], "per_shard": []}}
        write_atomic(root / MANIFEST, _dump(stub))
    return len(paths)


def _delete_merged(root: Path, manifest: dict) -> None:
    """The outputs merged from all shards: stale once any shard is redone."""
    top = _owned_top(manifest, Layout(root, manifest["num_shards"], manifest["format"]))
    _delete(root, ([root / CARD] if card_is_ours(root) else [])
            + [root / name for name in top if name not in (MANIFEST, CARD_COPY)], keep_dirs=True)


def _delete(root: Path, paths: list[Path], keep_dirs: bool = False) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
    for d in () if keep_dirs else (".partial", "stats", "data"):
        try:
            (root / d).rmdir()  # only if empty: a user's file there stays, and so does the folder
        except OSError:
            pass


def card_is_ours(root: Path) -> bool:
    """README.md is cogalign's card while its bytes equal the copy cogalign keeps of the card it wrote."""
    try:
        return (Path(root) / CARD).read_bytes() == (Path(root) / CARD_COPY).read_bytes()
    except FileNotFoundError:
        return False


def write_card(root: Path, card: bytes) -> Path:
    """Write the dataset card to README.md unless README.md is someone else's; returns where it went."""
    root = Path(root)
    ours = card_is_ours(root) or not (root / CARD).exists()
    write_atomic(root / CARD_COPY, card)
    if ours:
        write_atomic(root / CARD, card)
        return root / CARD
    return root / CARD_COPY
