"""hf://datasets inputs on a hand-built Hugging Face cache (no network): what docs/hub-input.md cites.

1. Counting rows from a remote parquet footer: the ranged reads and bytes that an fsspec buffered
   file (the class of HfFileSystem's files) fetches, against the whole file a download costs.
2. Reading the same files through hf://datasets (HF_HUB_OFFLINE=1, from the cache) against the
   local folder path: count + full iteration time, ratio.
3. Which files a slice downloads: slices of --num-shards N over a dataset of F files.

    python benchmarks/bench_hub_input.py [--files 8] [--rows 400] [--image-kb 150]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO, SHA = "bench/llava-like", "c" * 40


class CountingFile(fsspec.spec.AbstractBufferedFile):
    """A local file behind fsspec's buffered reader, counting the ranged reads (as HTTP range requests)."""

    def __init__(self, path: Path, block_size=None):
        self.local, self.requests, self.fetched = path, 0, 0
        super().__init__(fsspec.filesystem("file"), str(path), mode="rb", block_size=block_size,
                         size=path.stat().st_size)

    def _fetch_range(self, start, end):
        self.requests += 1
        with open(self.local, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        self.fetched += len(data)
        return data


def make_dataset(folder: Path, files: int, rows: int, image_kb: int) -> None:
    conv = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A test pattern."}]
    for i in range(files):
        table = pa.Table.from_pylist([{"id": f"{i}-{r}", "conversations": conv, "data_source": "bench",
                                       "image": {"bytes": os.urandom(image_kb * 1024), "path": f"im{r}.png"}}
                                      for r in range(rows)])
        (folder / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / "data" / f"train-{i:05d}-of-{files:05d}.parquet", row_group_size=64)


def hand_built_cache(cache: Path, files_from: Path) -> None:
    root = cache / ("datasets--" + REPO.replace("/", "--"))
    for src in sorted(p for p in files_from.rglob("*") if p.is_file()):
        blob = root / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, blob)
        link = root / "snapshots" / SHA / src.relative_to(files_from)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(SHA)


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--image-kb", type=int, default=150)
    ap.add_argument("--slices", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_dataset(tmp / "repo", args.files, args.rows, args.image_kb)
        os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp / "cache"))
        hand_built_cache(tmp / "cache", tmp / "repo")
        from cogalign.inputs import hub, resolve_input
        from cogalign.inputs import count_input as count_records, iter_input as iter_records

        first = sorted((tmp / "repo" / "data").iterdir())[0]
        size = first.stat().st_size
        print(f"dataset: {args.files} files x {args.rows} rows, {args.image_kb} kB images, {size / 1e6:.1f} MB per file\n")
        # a file whose footer outgrows pyarrow's first 64 KiB read: one row group per row
        grouped = tmp / "grouped.parquet"
        pq.write_table(pq.read_table(first), grouped, row_group_size=1)
        print("| row count of one file from its footer | requests | bytes fetched | share of the file |")
        print("|---|---|---|---|")
        for name, file in ((f"{args.rows // 64 + 1} row groups", first), (f"{args.rows} row groups", grouped)):
            f = CountingFile(file, None)  # fsspec's default block size, as HfFileSystem.open uses
            assert pq.ParquetFile(f).metadata.num_rows == args.rows
            print(f"| {name} | {f.requests} | {f.fetched:,} | {f.fetched / file.stat().st_size:.1%} |")

        spec = f"hf://datasets/{REPO}"
        local = tmp / "repo"

        def read(source):
            source = resolve_input(source)
            n = count_records(source, hashlib.sha256())
            assert sum(1 for _ in iter_records(source)) == n

        t_local, t_hub = timed(lambda: read(local)), timed(lambda: read(spec))
        print("\n| count (with the identity hash) + read every record (best of 3) | seconds | ratio |")
        print("|---|---|---|")
        print(f"| local folder path | {t_local:.3f} | 1.00 |")
        print(f"| {spec} (offline, from the cache) | {t_hub:.3f} | {t_hub / t_local:.2f} |")

        fetched = []
        original = hub.HubFile.local
        hub.HubFile.local = lambda self: (fetched.append(self.name), original(self))[1]
        shard_size = args.rows  # one output shard per input file
        print(f"\n| slice (--num-shards {args.slices}, shard size {shard_size}) | files downloaded | of |")
        print("|---|---|---|")
        source = resolve_input(spec)
        for k in range(args.slices):
            fetched.clear()
            for _ in iter_records(source, skip=lambda i, k=k: (i // shard_size) % args.slices != k):
                pass
            print(f"| {k} | {len(set(fetched))} | {args.files} |")
        hub.HubFile.local = original
        print(f"\nmachine: {os.cpu_count()} CPUs, shared with other work while measured; {sys.platform}")


if __name__ == "__main__":
    main()
