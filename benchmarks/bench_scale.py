#!/usr/bin/env python3
"""`expand` at the paper's scale: the main process's CPU per image record, records/s against the
worker count, and the process tree's own memory, in one run. Prints markdown tables.

Each measurement runs `cogalign.expand.executor.expand` in a fresh child process (this file with
--child) on N image records cycling over the example photos, at the defaults (672 px, quarter
regions) unless --targets says otherwise. The child reports its own CPU (`time.process_time`:
the main process, every thread) and its reaped children's (`RUSAGE_CHILDREN`: the workers),
both taken around the `expand()` call. Per-record figures are the difference between an N-record
run and a --base-record run of the same settings, divided by N - base: the fixed start-up
(tokenizer load, worker spawn, the start-up estimate's sample records) cancels out.

The parent samples, every --interval s, the USS (private memory) and PSS of the whole process
tree (the child and its workers) and keeps the peaks.

  python benchmarks/bench_scale.py                                   # px and vq,px at 240 records
  python benchmarks/bench_scale.py --records 2000 --workers 1 --targets vq,px --memory-only

Only the standard library is imported at module level: expand's workers re-import this file.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EXAMPLES, load_average, machine_lines, md_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_input(folder: Path, n: int) -> Path:
    """n image records cycling over the example photos (one QA pair each)."""
    source = [r for r in json.loads((EXAMPLES / "llava_mini.json").read_text()) if "image" in r]
    path = folder / f"images_{n}.jsonl"
    if not path.exists():
        with open(path, "w") as f:
            for i in range(n):
                r = source[i % len(source)]
                f.write(json.dumps({"id": f"r{i}", "image": r["image"], "conversations": r["conversations"][:2]}) + "\n")
    return path


def child(args) -> None:
    from cogalign.expand.executor import Runtime, expand
    from cogalign.options import ExpandOptions

    import dataclasses

    options = ExpandOptions(targets=args.targets, vq=args.vq, regions=args.regions)
    knobs = {"workers": int(args.workers), "progress": False, "overwrite": True, "batch_size": args.batch_size,
             "memory_budget": args.memory_budget}
    fields = {f.name for f in dataclasses.fields(Runtime)}  # --repo: an older cogalign may lack some
    runtime = Runtime(**{k: v for k, v in knobs.items() if k in fields})
    cpu0, kids0, wall0 = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = expand(args.input, args.out, options, runtime, image_root=EXAMPLES)
    wall = time.perf_counter() - wall0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"main_cpu": time.process_time() - cpu0, "wall": wall,
                      "worker_cpu": kids.ru_utime + kids.ru_stime - kids0.ru_utime - kids0.ru_stime,
                      "expanded": result.counts["expand"], "received": getattr(result, "main_received_bytes", -1)}))


def anonymous_bytes(pid: int) -> int:
    """A process's own anonymous memory (heap, mmap'd buffers; not file-backed pages such as libraries)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0


class TreeMemory:
    """Peak summed anonymous memory, USS and PSS of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float):
        import psutil

        self.psutil, self.root, self.interval = psutil, psutil.Process(pid), interval
        self.uss = self.pss = self.anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            uss = pss = anon = 0
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except self.psutil.Error:
                procs = []
            for p in procs:
                try:
                    info = p.memory_full_info()
                    uss, pss, anon = uss + info.uss, pss + info.pss, anon + anonymous_bytes(p.pid)
                except (self.psutil.Error, OSError):
                    pass
            self.uss, self.pss, self.anon = max(self.uss, uss), max(self.pss, pss), max(self.anon, anon)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(args, input_path: Path, targets: str, workers: int, repo: Path) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as out:
        cmd = [sys.executable, __file__, "--child", "--input", str(input_path), "--out", out, "--targets", targets,
               "--workers", str(workers), "--vq", args.vq, "--memory-budget", str(args.memory_budget),
               "--batch-size", str(args.batch_size), "--regions", args.regions]
        env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        with TreeMemory(proc.pid, args.interval) as memory:
            stdout, stderr = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"expand failed ({proc.returncode}): {stderr[-2000:]}")
        facts = json.loads(stdout.strip().splitlines()[-1])
        return {**facts, "uss": memory.uss, "pss": memory.pss, "anon": memory.anon}


def row_for(args, repo: Path, big: Path, base: Path, targets: str, workers: int) -> list:
    a = measure(args, big, targets, workers, repo)
    n = a["expanded"]
    row = [f"--targets {targets}" + ("" if repo == REPO else f" ({repo})"), workers, n]
    if args.memory_only:
        row += ["", "", f"{n / a['wall']:.1f}"]
    else:
        b = measure(args, base, targets, workers, repo)
        d = n - b["expanded"]
        row += [f"{(a['main_cpu'] - b['main_cpu']) / d * 1000:.2f}",
                f"{(a['worker_cpu'] - b['worker_cpu']) / d * 1000:.1f}",
                f"{d / (a['wall'] - b['wall']):.1f}"]
    return row + [f"{a['received'] / n / 1000:.2f}" if a["received"] >= 0 else "n/a", f"{a['anon'] / 2**20:.0f}",
                  f"{a['uss'] / 2**20:.0f}", f"{a['wall']:.1f}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--records", type=int, default=240)
    p.add_argument("--base-records", type=int, default=16)
    p.add_argument("--workers", default="1,2", help="worker counts to compare, comma-separated")
    p.add_argument("--targets", default="px;vq,px", help="target sets to measure, separated by ;")
    p.add_argument("--vq", default="demo")
    p.add_argument("--regions", default="quarters", help="--regions of expand (full: 7 MB RGB answers)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--memory-budget", type=int, default=512 * 1000 ** 2)
    p.add_argument("--memory-only", action="store_true", help="skip the base run (memory and wall only)")
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--repos", default=str(REPO),
                   help="cogalign checkouts the children import, comma-separated (e.g. the code before, then this one)")
    p.add_argument("--tmp", default=None, help="where inputs and outputs go (default: the system's temp folder)")
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0

    load_before = load_average()
    data = Path(tempfile.gettempdir()) / "cogalign-scalebench"
    data.mkdir(exist_ok=True)
    big, base = make_input(data, args.records), make_input(data, args.base_records)
    rows = []
    for repo in [Path(r) for r in args.repos.split(",")]:
        for targets in args.targets.split(";"):
            for workers in [int(w) for w in args.workers.split(",")]:
                rows.append(row_for(args, repo, big, base, targets, workers))
                print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    print(f"{args.records} image records (base run: {args.base_records}), 672 px, --regions {args.regions}, "
          f"tokenizer {args.vq}, batch {args.batch_size}, --memory-budget {args.memory_budget / 1e6:.0f}MB\n")
    print(md_table(["targets", "workers", "records", "main-process CPU ms / record",
                    "worker CPU ms / record (all workers)", "records/s (marginal)",
                    "kB to the main process / record", "peak anonymous memory of the tree (MiB)",
                    "peak USS of the tree (MiB)",
                    "wall of the whole call (s)"], rows))
    print()
    print(md_table(["machine", ""], [[k, v] for k, v in machine_lines()] +
                   [["load average before / after", f"{load_before} / {load_average()}"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
