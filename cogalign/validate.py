"""`validate` and `--dry-run`: the checks of `expand` without computing targets."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from cogalign import estimate
from cogalign.errors import RecordError
from cogalign.options import ExpandOptions
from cogalign.pool import PreparePool
from cogalign.progress import Progress
from cogalign.records import check_record, count_records, iter_records
from cogalign.worker import EXPAND, WorkerContext


@dataclass
class Validation:
    counts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    pass_reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.counts["reject"] == 0


def validate(input_path: str | Path, options: ExpandOptions, image_root: str | Path | None = None,
             workers: int = 2, rejects_path: str | Path | None = None, progress: bool = True) -> Validation:
    """Check every record and decode every image, in worker processes; write rejects as JSON lines."""
    input_path = Path(input_path)
    ctx = WorkerContext(options, Path(image_root) if image_root else input_path.parent, decode_only=True)
    result, started = Validation(), time.perf_counter()
    out = open(rejects_path, "wb") if rejects_path else None
    try:
        with Progress(count_records(input_path), enabled=progress, label="validate") as bar, \
                PreparePool(ctx, workers, chunk_size=16) as pool:
            for p in pool.map(iter_records(input_path)):
                result.counts[p.outcome] += 1
                if p.outcome == "reject":
                    result.reasons[p.reason] += 1
                    if out:
                        out.write(orjson.dumps({"index": p.index, "id": p.record_id, "reason": p.reason,
                                                "detail": p.detail}) + b"\n")
                elif p.outcome == "pass":
                    result.pass_reasons[p.reason] += 1
                bar.advance(expanded=p.outcome == EXPAND)
    finally:
        if out:
            out.close()
    result.seconds = time.perf_counter() - started
    return result


def dry_run(input_path: str | Path, options: ExpandOptions, tokenizer=None) -> dict:
    """Counts from the record checks alone (images are not opened) and the size of what expand would write."""
    counts, reasons = Counter(), Counter()
    for _, record in iter_records(input_path):
        try:
            if isinstance(record, RecordError):
                raise record
            counts[check_record(record).action] += 1
        except RecordError as e:
            counts["reject"] += 1
            reasons[e.reason] += 1
    chars = estimate.target_chars(options, tokenizer)
    per_record = estimate.record_bytes(options, tokenizer)
    return {"records": sum(counts.values()), "would_expand": counts["expand"], "would_pass": counts["pass"],
            "rejected_by_shape": counts["reject"], "reject_reasons": dict(reasons),
            "target_chars": chars, "estimated_output_bytes": Path(input_path).stat().st_size + counts["expand"] * per_record,
            "shard_size": estimate.auto_shard_size(options, tokenizer)}
