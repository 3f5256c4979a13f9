"""Kill -9 at several moments, resume, and compare bytes; torchrun ranks give the same bytes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import EXAMPLES, data_digest, run_module

# VQ at the paper's 672 px: its near-ties would show any dependence on ranks, threads or batches.
ARGS = ["expand", str(EXAMPLES), "--vq-resolution", "672", "--px-resolution", "16", "--no-progress", "--shard-size", "3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run_module(*ARGS, "--out", out, "--workers", "0")
    return data_digest(out)


@pytest.mark.parametrize("kill_at", ["write:2", "write:9", "publish:1", "publish:3", "marker:2"])
def test_kill_and_resume_gives_identical_bytes(tmp_path, reference, kill_at):
    out = tmp_path / "out"
    wrapper = Path(__file__).with_name("kill_wrapper.py")
    proc = subprocess.run([sys.executable, str(wrapper), *ARGS, "--out", str(out), "--workers", "1"],
                          env={**os.environ, "KILL_AT": kill_at}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "report.json").exists()
    for shard in (out / "data").iterdir():  # whatever is visible is whole: a valid parquet file
        i = int(shard.name.split("-")[1])
        assert pq.ParquetFile(shard).metadata.num_rows == min(3, 14 - 3 * i)
    complete = [p for p in (out / "stats").glob("shard-?????.json")
                if (out / "data" / f"train-{p.stem[6:]}-of-00005.parquet").exists()]
    resumed = run_module(*ARGS, "--out", out, "--workers", "1")
    if complete:  # the resume redoes only what was not complete
        assert f"skipped {len(complete)} shards" in resumed.stderr
    assert data_digest(out) == reference


def test_torchrun_two_ranks_same_bytes_as_one_process(tmp_path, reference):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "cogalign", *ARGS, "--out", str(out), "--workers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert data_digest(out) == reference
    # one summary, rank 0's, with the totals of report.json; no rank sends the user to merge-report
    records = [line for line in proc.stderr.splitlines() if line.startswith("records:")]
    assert records == ["records: 14  expanded: 13  passed: 1  rejected: 0"], proc.stderr[-3000:]
    assert "merge-report" not in proc.stderr and "throughput: " in proc.stderr


def test_slices_then_merge_report(tmp_path, reference):
    out = tmp_path / "out"
    first = run_module(*ARGS, "--out", out, "--workers", "0", "--num-shards", "2", "--shard-index", "1")
    assert "merge-report" in first.stderr and not (out / "report.json").exists()
    run_module(*ARGS, "--out", out, "--workers", "0", "--num-shards", "2", "--shard-index", "0")
    shutil.rmtree(out / "report.json", ignore_errors=True)
    (out / "report.json").unlink(missing_ok=True)
    run_module("merge-report", out)
    assert data_digest(out) == reference


def test_ctrl_c_stops_cleanly_and_resumes(tmp_path, reference):
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "cogalign", *ARGS, "--out", str(out), "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "stats").glob("shard-*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived")
    assert proc.returncode == 130, err[-2000:]
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert not list((out / ".partial").glob("*")) if (out / ".partial").exists() else True
    run_module(*ARGS, "--out", out, "--workers", "1")
    assert data_digest(out) == reference
