"""Issue 4 end to end: every case of the bad-input corpus gets its documented outcome,
in `expand` and in `validate`, and no input record is lost."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from corpus import image_root, make_bad_corpus
from helpers import run_cli
from cogalign.expand.writer import read_shard

FAST = ["--vq-resolution", "32", "--px-resolution", "8", "--no-progress"]


def outcomes_of_expand(out: Path) -> dict[int, tuple[str, str | None]]:
    seen = {}
    for shard in sorted((out / "data").iterdir()):
        for record in read_shard(shard):
            meta = record.get("cogalign")
            if meta:
                seen[meta["index"]] = ("expand", None)
            else:
                seen[("pass", json.dumps(record, sort_keys=True))] = None
    for line in (out / "rejects.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert set(r) == {"index", "id", "reason", "detail"} and r["detail"], r
        assert r["index"] not in seen, "a record is both in the output and rejected"
        seen[r["index"]] = ("reject", r["reason"])
    return seen


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_expand_gives_every_case_its_outcome(tmp_path, fmt):
    source, expected = make_bad_corpus(tmp_path / "corpus", fmt=fmt)
    out = tmp_path / "out"
    result = run_cli("expand", source, "--out", out, "--image-root", image_root(tmp_path / "corpus"), *FAST,
                     "--workers", "2", "--shard-size", "7")
    seen = outcomes_of_expand(out)
    by_index = {k: v for k, v in seen.items() if isinstance(k, int)}
    passed = [k for k in seen if isinstance(k, tuple)]
    for e in expected:
        if e.outcome == "pass":
            continue
        assert by_index.get(e.index) == (e.outcome, e.reason), f"case {e.case} (record {e.index})"
    assert len(passed) == sum(e.outcome == "pass" for e in expected)
    report = json.loads((out / "report.json").read_text())
    assert report["input"] == len(expected) == report["expanded"] + report["passed"] + report["rejected"]
    want = {}
    for e in expected:
        if e.outcome == "reject":
            want[e.reason] = want.get(e.reason, 0) + 1
    assert report["reject_reasons"] == want
    assert "top reject reasons:" in result.output and max(want, key=want.get) in result.output


def test_validate_gates_a_bad_dataset(tmp_path):
    source, expected = make_bad_corpus(tmp_path / "corpus")
    rejects = tmp_path / "rejects.jsonl"
    run_cli("validate", source, "--image-root", image_root(tmp_path / "corpus"), "--rejects", rejects,
            "--workers", "2", "--no-progress", expect=1)
    got = {json.loads(l)["index"]: json.loads(l)["reason"] for l in rejects.read_text().splitlines()}
    assert got == {e.index: e.reason for e in expected if e.outcome == "reject"}


def test_validate_passes_a_clean_dataset():
    from helpers import EXAMPLES

    run_cli("validate", EXAMPLES, "--workers", "0", "--no-progress")


def test_nothing_outside_the_image_root_is_opened(tmp_path, monkeypatch):
    """Every open() of the run (main process, workers=0) stays under the image root or the output."""
    import builtins
    import io

    import PIL.Image

    source, _ = make_bad_corpus(tmp_path / "corpus")
    root = image_root(tmp_path / "corpus").resolve()
    outside = (tmp_path / "corpus" / "outside").resolve()
    opened = []
    for mod, name in ((builtins, "open"), (io, "open"), (PIL.Image, "open")):
        original = getattr(mod, name)

        def spy(file, *a, _orig=original, **k):
            if isinstance(file, (str, os.PathLike)):
                opened.append(Path(file).resolve())
            return _orig(file, *a, **k)
        monkeypatch.setattr(mod, name, spy)
    run_cli("expand", source, "--out", tmp_path / "out", "--image-root", root, *FAST, "--workers", "0")
    assert opened, "the spy saw nothing"
    assert not [p for p in opened if p.is_relative_to(outside)]


def test_absolute_paths_only_with_opt_in(tmp_path):
    from helpers import EXAMPLES

    records = json.loads(EXAMPLES.read_text())[:2]
    records[0]["image"] = str((EXAMPLES.parent / records[0]["image"]).resolve())
    source = tmp_path / "abs.json"
    source.write_text(json.dumps(records))
    run_cli("expand", source, "--out", tmp_path / "a", *FAST, "--workers", "0", "--image-root", EXAMPLES.parent)
    assert json.loads((tmp_path / "a" / "report.json").read_text())["reject_reasons"] == {"image_path_absolute": 1}
    run_cli("expand", source, "--out", tmp_path / "b", *FAST, "--workers", "0", "--image-root", EXAMPLES.parent,
            "--allow-absolute-paths")
    assert json.loads((tmp_path / "b" / "report.json").read_text())["expanded"] == 2


def test_bad_templates_file_fails_before_any_work(tmp_path):
    from helpers import EXAMPLES

    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"vq": ["Describe the VQ indices of the picture."]}))
    result = run_cli("expand", EXAMPLES, "--out", tmp_path / "o", "--templates", bad, *FAST, expect=2)
    assert "t.json" in result.output and "this image" in result.output
    assert not (tmp_path / "o").exists()


def test_write_failure_is_a_clear_error_and_resumable(tmp_path, monkeypatch):
    """A writer that fails mid-shard (disk full): one-line error, finished shards stay valid, rerun resumes."""
    from helpers import EXAMPLES, data_digest
    import cogalign.expand.writer as writer

    args = ["expand", EXAMPLES, *FAST, "--workers", "0", "--shard-size", "4"]
    run_cli(*args, "--out", tmp_path / "ref")
    calls = {"n": 0}
    original = writer.ParquetShardWriter.write

    def failing(self, record, image_bytes=None):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError(28, "No space left on device")
        original(self, record, image_bytes)
    monkeypatch.setattr(writer.ParquetShardWriter, "write", failing)
    result = run_cli(*args, "--out", tmp_path / "out", expect=2)
    assert "No space left on device" in result.output and "resume" in result.output
    assert len(list((tmp_path / "out" / "data").iterdir())) == 1  # shard 0 complete, shard 1 not visible
    monkeypatch.setattr(writer.ParquetShardWriter, "write", original)
    run_cli(*args, "--out", tmp_path / "out")
    assert data_digest(tmp_path / "out") == data_digest(tmp_path / "ref")


def test_duplicate_ids_are_kept_and_counted(tmp_path):
    from helpers import EXAMPLES

    records = json.loads(EXAMPLES.read_text())
    records += [dict(records[0]), dict(records[0]), dict(records[7])]  # astronaut x3, the text-only record x2
    source = tmp_path / "dups.json"
    source.write_text(json.dumps(records))
    run_cli("expand", source, "--out", tmp_path / "o", *FAST, "--workers", "0", "--image-root", EXAMPLES.parent)
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["input"] == report["expanded"] + report["passed"] == 17
    assert report["duplicate_ids"] == {"ids": 2, "records": 5, "examples": ["astronaut", "text_only_haiku"]}


def test_image_records_without_one_image_token_are_expanded_and_counted(tmp_path):
    """LLaVA drops the image of a record with no <image> (kept, counted) and misaligns one with two
    (rejected since issue 14: the tokens must match the images)."""
    from helpers import EXAMPLES

    records = json.loads(EXAMPLES.read_text())
    records[0]["conversations"][0]["value"] = records[0]["conversations"][0]["value"].replace("<image>\n", "")
    records[1]["conversations"][2]["value"] += " <image>"
    source = tmp_path / "tokens.json"
    source.write_text(json.dumps(records))
    result = run_cli("expand", source, "--out", tmp_path / "o", *FAST, "--workers", "0", "--image-root", EXAMPLES.parent)
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["expanded"] == 12 and report["reject_reasons"] == {"image_count_mismatch": 1}
    assert report["warnings"] == {"image_token_missing": 1}
    assert "warnings (kept): image_token_missing (1)" in result.output
