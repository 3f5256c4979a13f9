"""`cogalign stats`: how long the turns of an output are, in characters and (given a tokenizer) tokens.

Trainers truncate at `model_max_length` without a word; this is the check before the GPU-days.
Turns are grouped by kind: the record's original turns, and the answers and questions cogalign
inserted (from the `cogalign.turns` provenance). A record's length is the sum of its turns' tokens,
without the chat template or the image's own tokens (both depend on the trainer), so the share over
`--max-length` is a lower bound.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cogalign.errors import CogalignError
from cogalign.hub.output import check_complete, count_records, inserted_turns, iter_layout
from cogalign.expand.progress import Progress

__all__ = ["TurnStats", "measure", "report", "table", "load_tokenizer", "KINDS", "BATCH_CHARS"]

KINDS = {"original": "original turns", "vq_answer": "VQ answers", "px_answer": "RGB answers",
         "vq_question": "VQ questions", "px_question": "RGB questions"}
BATCH_CHARS = 4 << 20  # tokenize in batches of about this many characters


def load_tokenizer(spec: str):
    """A `tokenizers` Tokenizer from a tokenizer.json, a folder holding one, or a Hub id (cache / HF_ENDPOINT)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise CogalignError("--tokenizer needs the `tokenizers` package: pip install \"cogalign[tokens]\"") from None
    path = Path(spec)
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        if file.is_file():
            return Tokenizer.from_file(str(file))
        if path.exists() or path.suffix == ".json":
            raise CogalignError(f"{file}: no tokenizer.json there; pass a Hugging Face fast tokenizer file, "
                                "its folder, or a Hub id")
        from cogalign.train.model import quiet_hub_logs

        with quiet_hub_logs():  # its retry warnings would add lines to the one-line error below
            return Tokenizer.from_pretrained(spec)
    except CogalignError:
        raise
    except Exception as e:
        text = " ".join(str(e).split())[:200]
        raise CogalignError(f"--tokenizer {spec}: cannot load a tokenizer ({text}); pass a local tokenizer.json, "
                            "or a Hub id that is cached or reachable (HF_ENDPOINT, HF_TOKEN)") from None


@dataclass
class TurnStats:
    """Characters and tokens of each turn kind (original, VQ answers, RGB answers, ...) and each record's total
    tokens."""
    chars: dict[str, array] = field(default_factory=lambda: {k: array("q") for k in KINDS})
    tokens: dict[str, array] = field(default_factory=lambda: {k: array("q") for k in KINDS})
    records: int = 0
    record_tokens: array = field(default_factory=lambda: array("q"))


def _summary(values: array) -> dict:
    if not values:
        return {"median": None, "p95": None, "max": None}
    arr = np.frombuffer(values, dtype=np.int64)
    return {"median": float(np.median(arr)), "p95": float(np.percentile(arr, 95)), "max": int(arr.max())}


class _Counter:
    """Tokenizes turns in batches (the tokenizer's threads help) and files the counts."""

    def __init__(self, tokenizer, stats: TurnStats):
        self.tokenizer, self.stats = tokenizer, stats
        self.texts: list[str] = []
        self.kinds: list[str] = []
        self.owner: list[int] = []  # which record (index into record_tokens) each text belongs to
        self.size = 0

    def add(self, text: str, kind: str, record: int) -> None:
        self.texts.append(text)
        self.kinds.append(kind)
        self.owner.append(record)
        self.size += len(text)
        if self.size >= BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        if not self.texts:
            return
        # encode_batch_fast (tokenizers >= 0.20) does not compute offsets, which 1M-token answers make large
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        for enc, kind, rec in zip(encode(self.texts, add_special_tokens=False), self.kinds, self.owner):
            n = len(enc.ids)
            self.stats.tokens[kind].append(n)
            self.stats.record_tokens[rec] += n
        self.texts, self.kinds, self.owner, self.size = [], [], [], 0


def measure(out: str | Path, tokenizer=None, progress: bool = True) -> TurnStats:
    """Characters (and tokens) of every turn of a complete output folder, streamed."""
    layout = check_complete(out)
    stats = TurnStats()
    counter = _Counter(tokenizer, stats) if tokenizer is not None else None
    with Progress(count_records(out), progress, label="stats") as bar:
        for record in iter_layout(layout):
            inserted = inserted_turns(record)
            rec = stats.records
            stats.records += 1
            stats.record_tokens.append(0)
            for i, turn in enumerate(record.get("conversations") or ()):
                text = turn.get("value") if isinstance(turn, dict) else None
                if not isinstance(text, str):
                    continue
                kind = "original" if i not in inserted else f"{inserted[i]}_{'question' if i % 2 == 0 else 'answer'}"
                stats.chars[kind].append(len(text))
                if counter:
                    counter.add(text, kind, rec)
            bar.advance()
    if counter:
        counter.flush()
    return stats


def report(stats: TurnStats, max_length: int, with_tokens: bool) -> dict:
    """The figures as a plain dict (what `--json` prints)."""
    kinds = {}
    for kind in KINDS:
        entry = {"count": len(stats.chars[kind]), "chars": _summary(stats.chars[kind])}
        if with_tokens:
            entry["tokens"] = _summary(stats.tokens[kind])
        kinds[kind] = entry
    out = {"records": stats.records, "turns": kinds, "max_length": max_length}
    if with_tokens:
        totals = np.frombuffer(stats.record_tokens, dtype=np.int64)
        over = int((totals > max_length).sum()) if totals.size else 0
        out["records_over_max_length"] = over
        out["share_over_max_length"] = over / totals.size if totals.size else 0.0
        out["record_tokens"] = _summary(stats.record_tokens)
    return out


def table(rep: dict) -> list[str]:
    """The figures as an aligned text table."""
    def num(v):
        return "-" if v is None else (f"{v:,.0f}" if isinstance(v, float) and v == int(v) else
                                       f"{v:,.1f}" if isinstance(v, float) else f"{v:,}")

    head = ["turn kind", "count", "chars median", "p95", "max"]
    with_tokens = "record_tokens" in rep
    if with_tokens:
        head += ["tokens median", "p95", "max"]
    rows = [head]
    for kind, label in KINDS.items():
        entry = rep["turns"][kind]
        row = [label, num(entry["count"])] + [num(entry["chars"][k]) for k in ("median", "p95", "max")]
        if with_tokens:
            row += [num(entry["tokens"][k]) for k in ("median", "p95", "max")]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.append(f"records: {rep['records']:,}")
    if with_tokens:
        t = rep["record_tokens"]
        lines.append(f"tokens per record (all turns, no chat template, no image tokens): median {num(t['median'])}, "
                     f"p95 {num(t['p95'])}, max {num(t['max'])}")
        lines.append(f"records over --max-length {rep['max_length']:,}: {rep['records_over_max_length']:,} "
                     f"({100 * rep['share_over_max_length']:.1f}%)")
    else:
        lines.append("tokens: pass --tokenizer tokenizer.json (or a Hub id) to count tokens and the share over --max-length")
    return lines
