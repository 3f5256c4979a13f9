"""Shared helpers for the end-to-end tests."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from cogalign.cli import app

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "llava_mini.json"
# Small working resolutions keep the suite fast; the logic is the same at 672.
FAST = ["--vq-resolution", "64", "--px-resolution", "16", "--no-progress"]


def run_cli(*args: str, expect: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


def run_module(*args: str, env: dict | None = None, check: bool = True, timeout: int = 300):
    """`python -m cogalign ...` in a fresh process, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "cogalign", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def data_digest(out: Path) -> dict[str, str]:
    """sha256 of every data shard and of the merged reports: what must be byte-identical."""
    files = sorted((out / "data").iterdir()) + [out / "rejects.jsonl", out / "report.json"]
    return {f.relative_to(out).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.exists()}


def one_line_error(result, *words: str) -> str:
    """A failed CLI result whose output is one line, `error: …`, holding each of `words`."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@contextlib.contextmanager
def hub_warnings_seen():
    """The records huggingface_hub logs while the block runs (a list, filled as they come)."""
    from huggingface_hub.utils import logging as hub_logging

    seen: list = []
    handler = logging.Handler()
    handler.emit = seen.append
    hub_logging.get_logger("huggingface_hub").addHandler(handler)
    try:
        yield seen
    finally:
        hub_logging.get_logger("huggingface_hub").removeHandler(handler)


def log_a_hub_retry() -> None:
    """What huggingface_hub logs before each retry of an unreachable Hub."""
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
