"""Output-path options of validate and expand: a missing folder is made, an impossible path is one line."""
import json
import os

import pytest

from tests.helpers import EXAMPLES, FAST, run_cli


def test_validate_rejects_in_a_folder_that_does_not_exist_yet(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "image": "missing.jpg",
                               "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}) + "\n")
    rejects = tmp_path / "nodir" / "x" / "rej.jsonl"
    run_cli("validate", bad, "--rejects", rejects, "--workers", "0", "--no-progress", expect=1)
    assert json.loads(rejects.read_text())["reason"] == "image_missing"


@pytest.mark.parametrize("rejects, message", [
    ("afile/rej.jsonl", "afile is a file, not a folder"),
    ("afile/x/rej.jsonl", "afile is a file, not a folder"),
    ("adir", "cannot write this file"),
])
def test_validate_rejects_path_that_cannot_be_written_is_one_line(tmp_path, rejects, message):
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "adir").mkdir()
    result = run_cli("validate", EXAMPLES, "--rejects", tmp_path / rejects, "--workers", "0", "--no-progress",
                     expect=2)
    assert result.output.startswith("error: --rejects") and message in result.output
    assert result.output.count("\n") == 1
    assert (tmp_path / "afile").read_text() == "mine"


def test_validate_never_writes_rejects_over_its_input(tmp_path):
    data = tmp_path / "llava.json"
    data.write_bytes(EXAMPLES.read_bytes())
    result = run_cli("validate", data, "--rejects", tmp_path / "." / "llava.json", "--workers", "0", "--no-progress",
                     expect=2)
    assert "is the input file" in result.output
    assert data.read_bytes() == EXAMPLES.read_bytes()


@pytest.mark.parametrize("out", ["afile", "afile/x"])
def test_expand_out_that_is_a_file_is_one_line(tmp_path, out):
    (tmp_path / "afile").write_text("mine")
    result = run_cli("expand", EXAMPLES, "--out", tmp_path / out, "--workers", "0", *FAST, expect=2)
    assert result.output.startswith(f"error: --out {tmp_path / out}: ") and "is a file, not a folder" in result.output
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("command", ["expand", "validate"])
def test_a_missing_image_root_is_refused_not_every_record(tmp_path, command):
    """A typo in --image-root used to run to the end and reject every image record as image_missing."""
    out = ["--out", tmp_path / "o", *FAST] if command == "expand" else []
    result = run_cli(command, EXAMPLES, "--image-root", tmp_path / "typo", *out, "--workers", "0", "--no-progress",
                     expect=2)
    assert "--image-root" in result.output and "no such folder" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_a_huge_shard_size_is_refused(tmp_path):
    result = run_cli("expand", EXAMPLES, "--out", tmp_path / "o", *FAST, "--shard-size", str(10**23), expect=2)
    assert "--shard-size" in result.output and not (tmp_path / "o").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc, where no folder can be made")
def test_an_out_that_cannot_be_made_is_one_line(tmp_path):
    """`expand --out /proc/x` (writable by os.access for root, yet no folder can be made there) was a traceback."""
    result = run_cli("expand", EXAMPLES, "--out", "/proc/cogalign-out", *FAST, "--workers", "0", expect=2)
    text = result.output.strip()
    assert text.startswith("error: --out /proc/cogalign-out") and len(text.splitlines()) == 1, text


@pytest.mark.parametrize("name", ["images/chelsea.png", "notes.txt"])
def test_validate_never_writes_rejects_over_an_image_or_a_file_of_yours(tmp_path, name):
    """--rejects naming one of the input's images (or any file validate did not write) used to truncate it."""
    (tmp_path / "images").mkdir()
    for image in ("chelsea.png", "coffee.png"):
        (tmp_path / "images" / image).write_bytes((EXAMPLES.parent / "images" / image).read_bytes())
    (tmp_path / "notes.txt").write_text("mine\n")
    records = [r for r in json.loads(EXAMPLES.read_text()) if r["id"] in ("chelsea", "coffee")]
    records.append({"id": "gone", "image": "images/gone.png",
                    "conversations": [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]})
    (tmp_path / "in.json").write_text(json.dumps(records))
    before = (tmp_path / name).read_bytes()
    result = run_cli("validate", tmp_path / "in.json", "--rejects", tmp_path / name, "--workers", "0",
                     "--no-progress", expect=2)
    assert result.output.startswith(f"error: --rejects {tmp_path / name}: exists and is not a rejects list")
    assert result.output.count("\n") == 1 and (tmp_path / name).read_bytes() == before
    rejects = tmp_path / "rejects.jsonl"  # a rerun replaces its own rejects list
    for _ in range(2):
        run_cli("validate", tmp_path / "in.json", "--rejects", rejects, "--workers", "0", "--no-progress", expect=1)
        assert [json.loads(line)["id"] for line in rejects.read_text().splitlines()] == ["gone"]
