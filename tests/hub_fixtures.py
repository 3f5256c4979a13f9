"""Outputs for the hub tests (publish, export, stats): real `cogalign expand` runs on the examples."""
from __future__ import annotations

import shutil
from pathlib import Path

import orjson

from helpers import EXAMPLES, FAST, run_cli


def expand_examples(out: Path, *extra: str) -> Path:
    run_cli("expand", EXAMPLES, "--out", out, *FAST, "--workers", "0", *extra)
    return out


def copy_output(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def append_records(out: Path, records: list[dict]) -> None:
    """Add hand-made records to the last shard of a jsonl output (what a user's edit or another tool might do)."""
    shard = sorted((out / "data").glob("*.jsonl"))[-1]
    with open(shard, "ab") as f:
        for record in records:
            f.write(orjson.dumps(record) + b"\n")
