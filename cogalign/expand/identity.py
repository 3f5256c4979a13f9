"""An input's identity, pinned in the run manifest: its files' sizes and mtimes, and a hash of
its bytes taken while they stream through the counting pass (no extra read).

For an input of several files (a folder), `cogalign.inputs.input_files` lists them in a fixed order and the
hash covers their bytes in that order; the reader that counts them feeds one digest.
"""
from __future__ import annotations

from cogalign.inputs import DatasetInput, input_files

__all__ = ["input_identity"]


def input_identity(path, sha256: str) -> dict:
    """What pins an input: size and mtime of its files, and a hash of the bytes as they were read.
    A resume compares the size and the hash; an mtime alone (a `touch`) changes nothing.
    A Hub dataset: its repo, revision, commit sha, config, split and files (the hash covers them)."""
    if isinstance(path, DatasetInput) and path.hub:
        return {"path": str(path), **path.hub, "config": path.config, "split": path.split,
                "size": sum(f.size for f in path.files), "sha256": sha256, "files": [f.name for f in path.files]}
    files = input_files(path)
    stats = [f.stat() for f in files]
    return {"path": str(path), "size": sum(s.st_size for s in stats),
            "mtime": max((s.st_mtime for s in stats), default=0.0), "sha256": sha256,
            **({"config": path.config, "split": path.split} if isinstance(path, DatasetInput) else {}),
            **({"files": [str(f) for f in files]} if len(files) > 1 else {})}
