"""What `cogalign train --out RUN` may touch.

RUN is a new or empty folder, or an earlier `cogalign train` run: RUN/cogalign_run.json names the
tool, the options that shape the run (pinned) and the files the run wrote. A folder with files of
someone else, or a file, is refused before anything is built. An earlier run is continued only with
`--resume` (pinned options unchanged, `--max-steps` may grow) or replaced with `--overwrite`, which
deletes only what the manifest lists and the run's own checkpoint-N/ folders.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from cogalign.errors import CogalignError

__all__ = ["prepare", "check", "checkpoints", "complete_checkpoints", "checkpoint_step", "read_run_manifest",
           "write_manifest", "pin_differences", "delete_run", "record_files", "RUN_MANIFEST", "TOOL", "RUN_FILES"]

RUN_MANIFEST = "cogalign_run.json"
TOOL = "cogalign train"
# names a run writes besides the model files that save_pretrained lists at the end
RUN_FILES = ["train_log.jsonl", "eval_log.jsonl", "train_summary.json", "cogalign_train.json", "cache", "runs",
             "adapter"]


def checkpoints(out: Path) -> list[Path]:
    """The Trainer's checkpoint-N folders, oldest first."""
    found = [p for p in Path(out).glob("checkpoint-*") if p.is_dir() and p.name[len("checkpoint-"):].isdigit()]
    return sorted(found, key=checkpoint_step)


def complete_checkpoints(out: Path) -> list[Path]:
    """The checkpoint-N folders saved to the end (each rank's state written last), oldest first."""
    return [c for c in checkpoints(out) if (c / "rank0_cogalign_state.json").exists()]


def checkpoint_step(checkpoint: Path) -> int:
    """N of a checkpoint-N folder."""
    return int(Path(checkpoint).name[len("checkpoint-"):])


def read_run_manifest(out: Path):
    """The `cogalign_run.json` of run folder `out`, or None when there is none that cogalign wrote."""
    path = Path(out) / RUN_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("tool") == TOOL else None


def pin_differences(old: dict, new: dict) -> list[str]:
    """The pinned options that differ between two manifests, as `name (old → new)`."""
    return [f"{k} ({json.dumps(old.get(k))} → {json.dumps(new.get(k))})"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check(out: Path, resume: bool, overwrite: bool):
    """Refuse a --out that is not ours to write (read-only; before any model is built). Returns the
    earlier run's manifest, if any."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CogalignError(f"--out {out} is a file: give a folder (new, empty, or an earlier `cogalign train` run)")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    manifest = read_run_manifest(out)
    if entries and manifest is None:
        raise CogalignError(f"--out {out} holds files that `cogalign train` did not write ({entries[0]}, ...): "
                            "give a new or empty folder")
    if resume and overwrite:
        raise CogalignError("--resume and --overwrite: choose one (continue the run, or replace it)")
    if resume and (manifest is None or not checkpoints(out)):
        raise CogalignError(f"--resume: no checkpoint-N folder in {out} (start without --resume)")
    if not resume and not overwrite and manifest is not None and entries != [RUN_MANIFEST]:
        found = checkpoints(out)
        what = found[-1].name if found else entries[0]
        raise CogalignError(f"--out {out} holds an earlier run ({what}): continue it with --resume, "
                            "or replace it with --overwrite")
    return manifest


def prepare(out: Path, pinned: dict, resume: bool, overwrite: bool, max_steps: int | None = None) -> None:
    """`check`, then: a resume must pin the same options and not ask for fewer steps than its last
    checkpoint holds; --overwrite deletes the earlier run's files; a new run writes its manifest."""
    out = Path(out)
    manifest = check(out, resume, overwrite)
    if resume:
        changed = pin_differences(manifest.get("pinned", {}), pinned)
        if changed:
            raise CogalignError(f"--resume: options differ from the run in {out}: {'; '.join(changed)}; "
                                "give the same options (only --max-steps may grow), or start anew with --overwrite")
        done = complete_checkpoints(out)
        reached = checkpoint_step(done[-1]) if done else 0  # where the run resumes (none: run.py says so)
        if max_steps is not None and max_steps < reached:
            raise CogalignError(f"--resume --max-steps {max_steps}: the run in {out} is already at step {reached} "
                                f"(checkpoint-{reached}); give --max-steps {reached} or more")
        return
    if manifest is not None:
        delete_run(out, manifest)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, {"tool": TOOL, "pinned": pinned, "files": list(RUN_FILES)})


def _written_by_run(rel: str, tree: set) -> bool:
    """A file the run wrote: listed in its manifest at the end, or in a place only a run writes to
    (a checkpoint-N/ that a killed run never listed, the Arrow cache, TensorBoard's event files)."""
    top, name = rel.split("/", 1)[0], rel.rsplit("/", 1)[-1]
    if rel in tree:
        return True
    if top.startswith("checkpoint-") and not any(t.startswith(top + "/") for t in tree):
        return True
    return (top == "cache" and name.endswith((".arrow", ".tmp"))) or (top == "runs" and name.startswith("events.out.tfevents."))


def delete_run(out: Path, manifest: dict) -> None:
    """Delete what the earlier run wrote (its manifest's list and its checkpoints), nothing else: a
    folder of the run that holds a file the run did not write is refused, and nothing is deleted."""
    names = set(manifest.get("files", [])) | set(RUN_FILES)
    targets = [*(out / n for n in sorted(names)), *checkpoints(out)]
    tree = set(manifest.get("tree", []))
    for p in targets:
        if p.is_dir() and not p.is_symlink():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(out).as_posix()
                if not f.is_dir() and not _written_by_run(rel, tree):
                    raise CogalignError(f"--overwrite: {out / rel} was not written by the earlier run; move it "
                                        "out of the run folder first (nothing was deleted)")
    for p in targets:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def write_manifest(out: Path, manifest: dict) -> None:
    """Write `cogalign_run.json` in `out` (through a temporary file)."""
    tmp = Path(out) / (RUN_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(Path(out) / RUN_MANIFEST)


def record_files(out: Path, before: set) -> None:
    """Add the top-level entries the run wrote (present now, absent when it started) to the manifest."""
    manifest = read_run_manifest(out) or {"tool": TOOL, "files": []}
    new = {p.name for p in Path(out).iterdir()} - before - {RUN_MANIFEST}
    manifest["files"] = sorted(set(manifest.get("files", [])) | new)
    inside = {f.relative_to(out).as_posix() for n in new if (Path(out) / n).is_dir()
              for f in (Path(out) / n).rglob("*") if not f.is_dir()}
    manifest["tree"] = sorted(set(manifest.get("tree", [])) | inside)  # files in the run's folders
    write_manifest(out, manifest)
