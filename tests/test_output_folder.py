"""The output folder: which files a run owns, slices and --overwrite, the input's identity, empty inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cogalign.expand.writer import read_shard
from helpers import EXAMPLES, FAST, data_digest, run_cli, run_module

ROOT = ["--image-root", str(EXAMPLES.parent)]
ARGS = [*FAST, "--workers", "0", "--targets", "px", "--shard-size", "3", *ROOT]  # 14 records -> 5 shards


def expand(src, out, *extra, expect=0):
    return run_cli("expand", src, "--out", out, *ARGS, *extra, expect=expect)


@pytest.fixture
def src(tmp_path):
    """A copy of the example input that a test may change."""
    path = tmp_path / "llava.json"
    path.write_bytes(EXAMPLES.read_bytes())
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    expand(EXAMPLES, out)
    return data_digest(out)


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# 1. ownership ---------------------------------------------------------------------

@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_folder_that_is_not_a_cogalign_output_is_refused(tmp_path, overwrite):
    out = tmp_path / "mine"
    (out / "data").mkdir(parents=True)
    (out / "stats").mkdir()
    (out / "data" / "mine.txt").write_text("mine")
    (out / "README.md").write_text("# my notes")
    (out / "x_cogalign.json").write_text("[]")
    before = snapshot(out)
    result = expand(EXAMPLES, out, *overwrite, expect=2)
    assert result.output.strip().count("\n") == 0 and str(out) in result.output
    assert "not a cogalign output" in result.output and "empty or new --out" in result.output
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["README.md", "data", "stats",
                                                                              "x_cogalign.json"]


@pytest.mark.parametrize("reset", [False, True])
def test_a_file_of_yours_named_as_the_merged_output_is_never_replaced(tmp_path, src, reset):
    """A parquet run, then your own llava_cogalign.json beside it, then `--format json --overwrite` (or a
    reset and a json run): the merged file was written over yours."""
    out = tmp_path / "out"
    expand(src, out)
    (out / "llava_cogalign.json").write_text('["mine"]')
    if reset:
        run_cli("reset", out)
    result = expand(src, out, "--format", "json", *([] if reset else ["--overwrite"]), expect=2)
    assert "llava_cogalign.json is a file cogalign did not write" in result.output
    assert result.output.strip().count("\n") == 0 and (out / "llava_cogalign.json").read_text() == '["mine"]'
    assert reset or (out / "data" / "train-00000-of-00005.parquet").is_file()  # nothing deleted either


def test_overwrite_and_card_touch_only_what_cogalign_wrote(tmp_path, src):
    out = tmp_path / "out"
    expand(src, out, "--format", "json")
    assert (out / "llava_cogalign.json").exists() and (out / "README.md").read_bytes() == (out / "stats/card.md").read_bytes()
    manifest = json.loads((out / "cogalign.json").read_text())
    assert "llava_cogalign.json" in manifest["owns"]["files"] and manifest["owns"]["shards"] == 5
    # the user adds files of their own, and replaces the card with their README
    (out / "data" / "mine.txt").write_text("mine")
    (out / "notes_cogalign.json").write_text("[1]")
    (out / "README.md").write_text("# my own README")
    expand(src, out, "--format", "json", "--seed", "5", "--overwrite")
    assert (out / "data" / "mine.txt").read_text() == "mine"
    assert (out / "notes_cogalign.json").read_text() == "[1]"
    assert (out / "README.md").read_text() == "# my own README"  # never replaced
    assert "seed | 5" in (out / "stats" / "card.md").read_text()  # the card went beside it
    assert json.loads((out / "report.json").read_text())["options"]["seed"] == 5
    result = run_cli("merge-report", out)
    assert "README.md is not cogalign's" in result.output and (out / "README.md").read_text() == "# my own README"


def test_reset_deletes_only_what_cogalign_wrote_and_keeps_the_folder_usable(tmp_path, src):
    out = tmp_path / "out"
    expand(src, out)
    (out / "notes.txt").write_text("mine")
    result = run_cli("reset", out)
    assert "kept: notes.txt" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["cogalign.json", "notes.txt"]
    run_cli("merge-report", out, expect=2)
    expand(src, out, "--seed", "2")  # a reset folder takes a new run
    assert json.loads((out / "report.json").read_text())["input"] == 14


# 2. slices and --overwrite -----------------------------------------------------------

def test_slice_overwrite_never_deletes_another_slices_shards(tmp_path, reference):
    out = tmp_path / "out"
    slices = ["--num-shards", "2", "--overwrite"]
    first = expand(EXAMPLES, out, *slices, "--shard-index", "1")
    assert "merge-report" in first.output and not (out / "report.json").exists()
    done_by_1 = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    last = expand(EXAMPLES, out, *slices, "--shard-index", "0")
    assert "merge-report" not in last.output and "records: 14" in last.output  # the last slice reports
    assert all((out / "data" / name).read_bytes() == data for name, data in done_by_1.items())
    assert data_digest(out) == reference
    # a requeued slice redoes its own shards; the others stay, and the output ends whole again
    again = expand(EXAMPLES, out, *slices, "--shard-index", "1")
    assert "records: 14" in again.output
    assert data_digest(out) == reference
    run_cli("merge-report", out)
    assert data_digest(out) == reference


def test_slurm_array_with_overwrite_concurrently(tmp_path, reference):
    """The same command in every task, at once, twice (a requeue): whole output both times."""
    out = tmp_path / "out"
    for _ in range(2):
        procs = [subprocess.Popen([sys.executable, "-m", "cogalign", "expand", str(EXAMPLES), "--out", str(out),
                                   *ARGS, "--num-shards", "2", "--shard-index", str(i), "--overwrite"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
        errs = [p.communicate(timeout=300)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), errs
        assert data_digest(out) == reference
    run_module("merge-report", out)
    assert data_digest(out) == reference


def test_a_slices_overwrite_leaves_the_shared_folders_to_the_other_slices(tmp_path):
    """A slice's --overwrite removed .partial/ (and data/, stats/) when they were empty, under another
    slice writing into them at that moment: its next write failed with ENOENT (seen in CI, 1 run in ~5)."""
    from cogalign.expand.layout import prepare, read_manifest

    out = tmp_path / "out"
    for i in (0, 1):
        run_cli("expand", EXAMPLES, "--out", out, *ARGS, "--num-shards", "2", "--shard-index", str(i))
    for name in ("data", "stats"):  # what the other slice's folders hold at the moment it starts
        for f in (out / name).iterdir():
            f.unlink()
    (out / ".partial").mkdir(exist_ok=True)
    assert prepare(out, read_manifest(out), overwrite=True, sliced=True, mine=lambda s: s % 2 == 0) == "overwrite"
    assert all((out / name).is_dir() for name in (".partial", "data", "stats"))


def test_slice_with_other_settings_is_refused_until_reset(tmp_path, reference):
    out = tmp_path / "out"
    expand(EXAMPLES, out, "--num-shards", "2", "--shard-index", "0", "--seed", "9")
    kept = snapshot(out / "data")
    result = expand(EXAMPLES, out, "--num-shards", "2", "--shard-index", "1", "--overwrite", expect=2)
    assert "seed: 9 -> 0" in result.output and f"cogalign reset {out}" in result.output
    assert snapshot(out / "data") == kept
    run_cli("reset", out)
    for i in (1, 0):
        expand(EXAMPLES, out, "--num-shards", "2", "--shard-index", str(i), "--overwrite")
    assert data_digest(out) == reference


# 3. the input's identity ----------------------------------------------------------------

def test_changed_input_with_same_record_count_is_refused(tmp_path, src):
    out = tmp_path / "out"
    expand(src, out)
    identity = json.loads((out / "cogalign.json").read_text())["input_identity"]
    assert identity["size"] == src.stat().st_size and len(identity["sha256"]) == 64 and identity["mtime"] > 0
    src.write_text(src.read_text().replace("orange flight suit", "ORANGE flight suit"))  # same size and count
    result = expand(src, out, expect=2)
    assert "input: llava.json" in result.output and "--overwrite" in result.output
    expand(src, out, "--overwrite")
    assert any("ORANGE" in t["value"] for r in read_shard(out / "data" / "train-00000-of-00005.parquet")
               for t in r["conversations"])
    assert json.loads((out / "cogalign.json").read_text())["input_identity"]["sha256"] != identity["sha256"]


def test_touched_input_resumes(tmp_path, src):
    out = tmp_path / "out"
    expand(src, out)
    (out / "stats" / "shard-00001.json").unlink()
    os.utime(src, (time.time() + 100, time.time() + 100))
    result = expand(src, out)
    assert "skipped 4 shards" in result.output


def test_slices_of_different_inputs_are_refused(tmp_path, src):
    out = tmp_path / "out"
    other = tmp_path / "other.json"
    other.write_text(src.read_text().replace("orange flight suit", "ORANGE flight suit"))
    expand(src, out, "--num-shards", "2", "--shard-index", "0")
    result = expand(other, out, "--num-shards", "2", "--shard-index", "1", expect=2)
    assert "llava.json" in result.output and "other.json" in result.output
    assert not (out / "report.json").exists()


# 4. empty inputs ------------------------------------------------------------------------

@pytest.mark.parametrize("name, text", [("e.json", "[]"), ("e.json", " [ ]\n"), ("e.jsonl", ""), ("e.jsonl", "\n\n")])
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_empty_input_finishes(tmp_path, name, text, fmt):
    src = tmp_path / name
    src.write_text(text)
    out = tmp_path / "out"
    result = expand(src, out, "--format", fmt)
    assert "records: 0" in result.output and "merge-report" not in result.output
    report = json.loads((out / "report.json").read_text())
    assert {k: report[k] for k in ("input", "expanded", "passed", "rejected")} == dict.fromkeys(
        ("input", "expanded", "passed", "rejected"), 0)
    assert (out / "README.md").exists() and (out / "rejects.jsonl").read_text() == ""
    assert len(list((out / "data").iterdir())) == 1
    (out / "report.json").unlink()
    run_cli("merge-report", out)
    assert json.loads((out / "report.json").read_text())["input"] == 0


def test_out_that_is_a_file_is_one_line(tmp_path):
    out = tmp_path / "a_file"
    out.write_text("mine")
    result = expand(EXAMPLES, out, expect=2)
    assert "is a file" in result.output and result.output.strip().count("\n") == 0 and out.read_text() == "mine"
