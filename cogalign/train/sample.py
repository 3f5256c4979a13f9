"""`cogalign train --print-sample N`: record N of the output folder (shard order, not shuffled),
rendered exactly as training renders it: its input text, each supervised run, its image tokens."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from cogalign.errors import CogalignError

__all__ = ["render_sample", "runs"]


def runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The contiguous runs of supervised tokens, in order."""
    out, cur = [], []
    for i, label in zip(ids, labels):
        if label == -100:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(i)
    return out + ([cur] if cur else [])


def render_sample(data: Path, n: int, processor, max_length: int = 2048, vq_tokens: str = "text",
                  image_root: Optional[Path] = None) -> dict:
    """Record `n` of output folder `data` as training sees it: input text, supervised runs and image token counts."""
    from cogalign.train.chat import record_system
    from cogalign.train.collate import Encoder
    from cogalign.train.data import ShardDataset
    from cogalign.train.model import resize_mode

    ds = ShardDataset(data, image_root=image_root)
    if not 0 <= n < ds.num_records:
        raise CogalignError(f"--print-sample {n}: {data} holds records 0 to {ds.num_records - 1}")
    record = ds.record(n)
    got = ds._image(record)
    if got["skip"]:
        raise CogalignError(f"--print-sample {n}: training skips this record ({got['skip']}: {got['detail']})")
    enc = Encoder(processor, max_length, vq_tokens, resize_mode(data))
    try:
        row = enc.encode_record(record["conversations"], got["images"], record_system(record))
    except ValueError as e:
        raise CogalignError(f"--print-sample {n}: training skips record {record.get('id')!r} ({e})") from None
    ids = row["input_ids"]
    decode = lambda t: processor.tokenizer.decode(t, skip_special_tokens=False)  # noqa: E731
    return {"id": record.get("id"), "input_text": decode(ids), "supervised": [decode(r) for r in runs(ids, row["labels"])],
            "image_tokens": ids.count(enc.image_id)}
