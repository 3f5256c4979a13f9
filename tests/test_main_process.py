"""`expand` at scale: the main process only batches VQ crops (RGB answers never reach it), shard
workers survive crashes, the memory budget never shapes the output, a run that cannot fit is refused."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

from cogalign.expand.executor import Runtime, expand
from cogalign.options import ExpandOptions
from cogalign.expand.writer import read_shard
from helpers import EXAMPLES, FAST, data_digest, run_cli

RECORDS = json.loads(EXAMPLES.read_text())


def test_main_process_never_receives_an_rgb_answer(tmp_path):
    """At 672 px each RGB answer is ~1.8 MB; what crosses to the main process stays a few kB a record."""
    source = tmp_path / "in.json"
    source.write_text(json.dumps(RECORDS[:3]))
    options = ExpandOptions(vq_resolution=(64, 64), px_resolution=(672, 672))
    result = expand(source, tmp_path / "out", options, Runtime(workers=1, progress=False), image_root=EXAMPLES.parent)
    answers = [t["value"] for r in read_shard(next((tmp_path / "out" / "data").iterdir()))
               for t in r["conversations"] if t["value"].startswith("<rgb start>")]
    assert len(answers) == 3 and min(map(len, answers)) > 1_500_000
    assert result.counts["expand"] == 3
    assert 0 < result.main_received_bytes < 3 * 20_000, result.main_received_bytes


def test_memory_budget_never_changes_the_bytes(tmp_path):
    run_cli("expand", EXAMPLES, "--out", tmp_path / "a", *FAST, "--workers", "0", "--shard-size", "4")
    run_cli("expand", EXAMPLES, "--out", tmp_path / "b", *FAST, "--workers", "2", "--shard-size", "4",
            "--batch-size", "3", "--memory-budget", "16MB")
    assert data_digest(tmp_path / "a") == data_digest(tmp_path / "b")
    bad = run_cli("expand", EXAMPLES, "--out", tmp_path / "c", *FAST, "--memory-budget", "lots", expect=2)
    assert "--memory-budget lots" in bad.output and not (tmp_path / "c").exists()


def test_a_run_that_cannot_fit_is_refused_before_any_work(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "out"
    result = run_cli("expand", EXAMPLES, "--out", out, *FAST, "--workers", "0", expect=2)
    line = result.output.strip().splitlines()[-1]
    assert "needs about" in line and "only 1.0 kB is free" in line, line
    assert "--px-resolution" in line and "--targets" in line and "--ignore-disk-space" in line
    assert not out.exists()
    ok = run_cli("expand", EXAMPLES, "--out", out, *FAST, "--workers", "0", "--ignore-disk-space")
    start = next(line for line in ok.output.splitlines() if line.startswith("expand: "))
    assert "14 of 14 records" in start and "estimated output" in start and "about" in start


CRASHING = """
import os, sys
import cogalign.expand.worker as worker

if __name__ == "__mp_main__":  # in each shard worker: record 2 kills its process, every time
    original = worker.prepare
    worker.prepare = lambda index, record, ctx: os._exit(3) if index == 2 else original(index, record, ctx)

if __name__ == "__main__":
    from cogalign.expand.executor import Runtime, expand
    from cogalign.options import ExpandOptions
    result = expand({examples!r}, sys.argv[1], ExpandOptions(vq_resolution=(64, 64), px_resolution=(16, 16)),
                    Runtime(workers=1, progress=False, shard_size=4))
    print(result.worker_restarts, dict(result.counts))
"""


def _run_script(tmp_path: Path, name: str, template: str, timeout: int):
    """`template` (with `{examples}`) as a user's script, run on out/ in a fresh interpreter; it must exit 0."""
    script = tmp_path / f"{name}.py"
    script.write_text(template.format(examples=str(EXAMPLES)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_a_record_that_kills_its_shard_worker_twice_is_rejected(tmp_path):
    proc = _run_script(tmp_path, "crashing", CRASHING, timeout=300)
    assert proc.stdout.split()[0] == "2"  # the crash, then the same record again
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["input"] == 14 and report["reject_reasons"] == {"worker_crashed": 1}
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rejects] == [2]
    # the records around it are written as a run without the crash writes them
    run_cli("expand", EXAMPLES, "--out", tmp_path / "ref", *FAST, "--workers", "0", "--shard-size", "4")
    got = [r for shard in sorted((tmp_path / "out" / "data").iterdir()) for r in read_shard(shard)]
    want = [r for shard in sorted((tmp_path / "ref" / "data").iterdir()) for r in read_shard(shard)]
    assert got == [r for r in want if (r.get("cogalign") or {}).get("index") != 2]


def test_a_budget_below_one_shard_still_finishes_with_the_same_bytes(tmp_path):
    """The reader waits for shards to be published once the budget is spent, never for ever."""
    options = ExpandOptions(vq_resolution=(64, 64), px_resolution=(16, 16))
    expand(EXAMPLES, tmp_path / "a", options, Runtime(workers=0, progress=False, shard_size=3))
    expand(EXAMPLES, tmp_path / "b", options, Runtime(workers=2, progress=False, shard_size=3, memory_budget=1))
    assert data_digest(tmp_path / "a") == data_digest(tmp_path / "b")


def test_shared_memory_ring_frees_in_order_and_wraps():
    from cogalign.expand.shardpool import Ring

    ring = Ring(100)
    assert [ring.alloc(t, 40) for t in range(3)] == [0, 40, None]  # 80 used, 20 left at the end
    ring.free(1)  # out of order: held until ticket 0 is freed too
    assert ring.alloc(2, 30) is None
    ring.free(0)
    assert ring.alloc(2, 30) == 0  # everything was freed: starts over
    assert ring.alloc(3, 50) == 30 and ring.alloc(4, 30) is None
    ring.free(2)
    assert ring.alloc(4, 25) == 0  # wraps around in front of ticket 3


def test_startup_estimate_needs_no_tokenizer_call():
    """expand's start-up estimate builds its sample records with indices of the right count instead
    of encoding them (the encoder's time is counted from its FLOPs): it never calls the tokenizer,
    and its size is the one the same samples give encoded (--dry-run's way, near the real output)."""
    from cogalign.expand import validate
    from cogalign.expand.executor import resolve_options

    options, sampler, tokenizer = resolve_options(ExpandOptions(vq_resolution=(64, 64), px_resolution=(16, 16)),
                                                  Runtime())
    encoded = validate.dry_run(EXAMPLES, options, tokenizer, sampler, EXAMPLES.parent, samples=3)

    def refuse(images):
        raise AssertionError("the start-up estimate called the tokenizer")

    tokenizer.encode = refuse
    need, seconds, facts = validate.startup_estimate(EXAMPLES, options, tokenizer, sampler, EXAMPLES.parent, 1)
    assert facts["sampled_records"] == 3 and seconds > 0
    assert abs(facts["vq_turn_chars_mean"] - encoded["vq_turn_chars_mean"]) <= 0.02 * encoded["vq_turn_chars_mean"]
    assert abs(need - encoded["estimated_output_bytes"]) <= 0.02 * encoded["estimated_output_bytes"], (need, encoded)


def test_startup_estimate_counts_the_workers_writing(monkeypatch):
    """The time estimate left out serialising and compressing, a shard worker's main cost at large
    RGB answers (the start-up line said ~1 s for runs of 3-5 s): each record's write now counts."""
    from cogalign.expand import estimate, validate
    from cogalign.expand.executor import resolve_options

    options, sampler, tokenizer = resolve_options(ExpandOptions(targets="px", px_resolution=(16, 16)), Runtime())
    args = (EXAMPLES, options, tokenizer, sampler, EXAMPLES.parent, 2)
    _, base, facts = validate.startup_estimate(*args)
    assert estimate.write_seconds([{"conversations": [{"from": "human", "value": "x" * 10**6}]}] * 2, "parquet") > 0
    monkeypatch.setattr(estimate, "write_seconds", lambda records, fmt, images=None: 10.0)
    _, slow, _ = validate.startup_estimate(*args)
    assert slow - base >= 0.9 * facts["would_expand"] * 10.0 / 2  # 10 s a record over 2 workers


def test_encoder_flops_are_counted_without_running_it():
    """The estimate's encoder time rests on `flops`, counted from the modules' shapes: it matches
    what torch's FLOP counter sees in a real forward pass (convolutions, attention, lookup)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cogalign.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("demo", device="cpu")
    for h, w in [(64, 64), (64, 128)]:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            tokenizer.lookup(tokenizer.pre_quant(torch.zeros(1, 3, h, w)))
        assert abs(tokenizer.flops(h, w) / counter.get_total_flops() - 1) < 0.01


def test_a_cpu_encoder_takes_crops_as_soon_as_its_threads_can():
    """On the CPU each image runs alone on one thread: the pool encodes once it holds a crop per
    thread instead of waiting for --batch-size crops (the workers keep working meanwhile); a GPU
    encoder still gets whole batches. The bytes never depend on it (test above)."""
    from types import SimpleNamespace

    import torch

    from cogalign.expand.shardpool import encode_batch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cpu = SimpleNamespace(device=torch.device("cpu"))
        assert encode_batch(cpu, 32) == 2 and encode_batch(cpu, 1) == 1
    finally:
        torch.set_num_threads(threads)
    assert encode_batch(SimpleNamespace(device=torch.device("cuda")), 32) == 32 and encode_batch(None, 32) == 32


DISK_FULL = """
import sys
import cogalign.expand.writer as writer

if __name__ == "__mp_main__":  # in each shard worker: the disk fills up at the 7th record written
    original, calls = writer.ParquetShardWriter.write, [0]

    def write(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] >= 7:
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)
    writer.ParquetShardWriter.write = write

if __name__ == "__main__":
    from cogalign.errors import CogalignError
    from cogalign.expand.executor import Runtime, expand
    from cogalign.options import ExpandOptions
    try:
        result = expand({examples!r}, sys.argv[1], ExpandOptions(vq_resolution=(64, 64), px_resolution=(16, 16)),
                        Runtime(workers=1, progress=False, shard_size=4))
    except CogalignError as e:
        print("error:", e)
"""


def test_a_write_error_in_a_shard_worker_stops_the_run_with_its_message(tmp_path):
    """A disk full in a worker is reported as such and ends the run (it was taken for a worker crash:
    the worker was restarted again and again, redoing its shard, or the run ended blaming the workers)."""
    proc = _run_script(tmp_path, "disk_full", DISK_FULL, timeout=120)
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("error: ") and "No space left on device" in line and "resume" in line, line
    assert "died" not in line
    assert len(list((tmp_path / "out" / "data").iterdir())) == 1  # shard 0 complete, shard 1 not published


def test_shared_memory_has_no_name_once_the_workers_hold_it(tmp_path, monkeypatch):
    """A kill -9 of the whole process group (Slurm, `timeout -s KILL`) kills the resource tracker too:
    an arena still named under /dev/shm would stay there, taking RAM, until the machine reboots."""
    from cogalign.expand.shardpool import ShardPool

    named, handle = [], ShardPool._handle

    def spy(self, i, msg):
        if msg[0] == "done":
            named.append((Path("/dev/shm") / self.slots[i].arena.name.lstrip("/")).exists())
        return handle(self, i, msg)
    monkeypatch.setattr(ShardPool, "_handle", spy)
    options = ExpandOptions(vq_resolution=(64, 64), px_resolution=(16, 16))
    expand(EXAMPLES, tmp_path / "a", options, Runtime(workers=0, progress=False, shard_size=5))
    expand(EXAMPLES, tmp_path / "b", options, Runtime(workers=2, progress=False, shard_size=5))
    assert named == [False] * 3
    assert data_digest(tmp_path / "a") == data_digest(tmp_path / "b")


CLOSE_KILLED = """
import os, sys
import cogalign.expand.writer as writer

if __name__ == "__mp_main__":  # every shard worker dies while it compresses a shard (out of memory)
    writer.ParquetShardWriter.close_partial = lambda self: os._exit(9)

if __name__ == "__main__":
    from cogalign.errors import CogalignError
    from cogalign.expand.executor import Runtime, expand
    from cogalign.options import ExpandOptions
    try:
        expand({examples!r}, sys.argv[1], ExpandOptions(vq_resolution=(64, 64), px_resolution=(16, 16)),
               Runtime(workers=1, progress=False, shard_size=4))
    except CogalignError as e:
        print("error:", e)
"""


def test_workers_that_die_writing_every_shard_end_the_run(tmp_path):
    """No record is to blame (the worker dies between records, closing the shard): each redo of the
    shard counted as progress, and the run restarted workers for ever."""
    proc = _run_script(tmp_path, "close_killed", CLOSE_KILLED, timeout=60)
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("error: worker processes died") and "writing a shard" in line and "--workers 0" in line
    assert not list((tmp_path / "out" / "data").iterdir())
