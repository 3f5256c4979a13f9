"""End to end: `cogalign expand` on the shipped examples, as a user runs it."""
from __future__ import annotations

import json
import re

import numpy as np
import orjson
import pytest

from cogalign.inputs.images import load_image, to_working
from cogalign.targets.regions import Region
from cogalign.targets.render import parse_px, parse_vq
from cogalign.tokenizers import load_tokenizer
from cogalign.expand.writer import read_shard
from helpers import EXAMPLES, FAST, data_digest, run_cli

VQ_HINT = re.compile(r"Note that the image resolution is \[3, (\d+), (\d+)\], so you should generate (\d+) indices$")


@pytest.fixture(scope="module")
def expanded(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = run_cli("expand", EXAMPLES, "--out", out, *FAST, "--workers", "0", "--batch-size", "3")
    return out, result.output


def all_records(out):
    return [r for f in sorted((out / "data").iterdir()) for r in read_shard(f)]


def test_summary_and_report(expanded):
    out, output = expanded
    report = json.loads((out / "report.json").read_text())
    assert {k: report[k] for k in ("input", "expanded", "passed", "rejected")} == \
        {"input": 14, "expanded": 13, "passed": 1, "rejected": 0}
    assert report["pass_reasons"] == {"text_only": 1}
    assert (out / "rejects.jsonl").read_text() == ""
    assert "expanded: 13" in output and "passed: 1" in output and str(out) in output
    assert "records/s" in output


def test_parquet_loads_with_datasets(expanded):
    import datasets

    out, _ = expanded
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.num_rows == 14
    assert ds.column_names[:3] == ["id", "image", "conversations"]
    source = json.loads(EXAMPLES.read_text())
    assert ds["id"] == [r["id"] for r in source]  # input order kept


def test_every_image_record_gains_one_vq_and_one_px_pair(expanded):
    out, _ = expanded
    source = json.loads(EXAMPLES.read_text())
    tokenizer = load_tokenizer("demo")
    for before, after in zip(source, all_records(out)):
        if "image" not in before:
            assert after == before
            continue
        convs = after["conversations"]
        assert len(convs) == len(before["conversations"]) + 4
        assert [t["from"] for t in convs] == ["human", "gpt"] * (len(convs) // 2)
        assert [t for t in convs if t in before["conversations"]] == before["conversations"]
        assert "<image>" in convs[0]["value"]
        meta = after["cogalign"]
        assert [t["kind"] for t in meta["turns"]] == ["vq", "px"]
        assert meta["tokenizer_hash"] == tokenizer.content_hash
        image = load_image(EXAMPLES.parent / before["image"])
        for turn in meta["turns"]:
            tag = "<vq start>" if turn["kind"] == "vq" else "<rgb start>"
            (pos,) = [i for i, t in enumerate(convs) if t["value"].startswith(tag)]
            others_before = [t for t in meta["turns"] if t is not turn and (
                t["position"] < turn["position"] or (t["position"] == turn["position"] and t["kind"] == "vq"))]
            assert pos == 2 * (turn["position"] + len(others_before)) + 1
            human, gpt = convs[pos - 1]["value"], convs[pos]["value"]
            assert "<image>" not in human + gpt
            region = Region(turn["region"], tuple(turn["box"]))
            assert region.phrase() in human
            working = to_working(image, tuple(turn["resolution"]))
            crop = region.crop(working)
            if turn["kind"] == "px":
                assert human.endswith(f"Note that the image resolution is [3, {working.shape[0]}, {working.shape[1]}].")
                assert gpt == "<rgb start>" + str(crop.reshape(-1, 3).tolist()) + "<rgb end>"
                assert np.array_equal(parse_px(gpt), crop.reshape(-1, 3))
            else:
                h, w, n = map(int, VQ_HINT.search(human).groups())
                indices = parse_vq(gpt)
                assert (h, w) == working.shape[:2] and n == len(indices) == crop.shape[0] * crop.shape[1] // 64
                expected = tokenizer.encode(np.ascontiguousarray(crop)[None])[0].reshape(-1)
                assert np.array_equal(indices, expected)


def test_same_seed_same_bytes_whatever_batch_size_and_workers(expanded, tmp_path):
    out, _ = expanded
    other = tmp_path / "other"
    run_cli("expand", EXAMPLES, "--out", other, *FAST, "--workers", "2", "--batch-size", "32")
    assert data_digest(other) == data_digest(out)


def test_another_seed_changes_the_choices(expanded, tmp_path):
    out, _ = expanded
    run_cli("expand", EXAMPLES, "--out", tmp_path / "s1", *FAST, "--workers", "0", "--seed", "1")
    turns0 = [r["cogalign"]["turns"] for r in all_records(out) if r.get("cogalign")]
    turns1 = [r["cogalign"]["turns"] for r in all_records(tmp_path / "s1") if r.get("cogalign")]
    assert turns0 != turns1


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_llava_file_formats_hold_the_same_records(expanded, tmp_path, fmt):
    out, _ = expanded
    run_cli("expand", EXAMPLES, "--out", tmp_path, *FAST, "--workers", "0", "--format", fmt)
    merged = tmp_path / f"llava_mini_cogalign.{fmt}"
    records = json.loads(merged.read_text()) if fmt == "json" else \
        [orjson.loads(line) for line in merged.read_bytes().splitlines()]
    assert records == all_records(out)


def test_targets_and_regions_options(tmp_path):
    run_cli("expand", EXAMPLES, "--out", tmp_path, *FAST, "--workers", "0", "--targets", "px",
            "--regions", "full,left")
    for r in all_records(tmp_path):
        if r.get("cogalign"):
            (turn,) = r["cogalign"]["turns"]
            assert turn["kind"] == "px" and turn["region"] in ("full", "left")


def test_resume_redoes_only_missing_shards(tmp_path):
    out = tmp_path / "out"
    run_cli("expand", EXAMPLES, "--out", out, *FAST, "--workers", "0", "--shard-size", "4")
    first = data_digest(out)
    assert len(list((out / "data").iterdir())) == 4
    (out / "stats" / "shard-00002.json").unlink()  # as if killed before the marker
    (out / "data" / "train-00001-of-00004.parquet").unlink()
    (out / "stats" / "shard-00001.json").unlink()
    result = run_cli("expand", EXAMPLES, "--out", out, *FAST, "--workers", "0", "--shard-size", "4")
    assert "skipped 2 shards" in result.output
    assert data_digest(out) == first


def test_resume_with_other_options_is_refused(tmp_path):
    run_cli("expand", EXAMPLES, "--out", tmp_path, *FAST, "--workers", "0")
    result = run_cli("expand", EXAMPLES, "--out", tmp_path, *FAST, "--workers", "0", "--seed", "7", expect=2)
    assert "different settings" in result.output and "seed" in result.output and "--overwrite" in result.output
    run_cli("expand", EXAMPLES, "--out", tmp_path, *FAST, "--workers", "0", "--seed", "7", "--overwrite")
    assert json.loads((tmp_path / "report.json").read_text())["options"]["seed"] == 7


def test_dry_run_counts_without_writing(tmp_path):
    result = run_cli("expand", EXAMPLES, "--out", tmp_path / "o", *FAST, "--dry-run")
    assert "would_expand: 13" in result.output and "would_pass: 1" in result.output
    assert "estimated_output_bytes" in result.output and not (tmp_path / "o").exists()


def test_bad_option_is_one_line_error(tmp_path):
    result = run_cli("expand", EXAMPLES, "--out", tmp_path, "--regions", "upper-middle", expect=2)
    assert "upper-middle" in result.output and result.output.count("\n") <= 2
    result = run_cli("expand", EXAMPLES, "--out", tmp_path, "--vq-resolution", "100", expect=2)
    assert "multiple" in result.output


def test_image_scope_slices_the_whole_image_grid(tmp_path):
    run_cli("expand", EXAMPLES, "--out", tmp_path, *FAST, "--workers", "0", "--vq-scope", "image",
            "--targets", "vq")
    tokenizer = load_tokenizer("demo")
    source = {r["id"]: r for r in json.loads(EXAMPLES.read_text())}
    for r in all_records(tmp_path):
        if not r.get("cogalign"):
            continue
        assert r["cogalign"]["vq_scope"] == "image"
        (turn,) = r["cogalign"]["turns"]
        working = to_working(load_image(EXAMPLES.parent / source[r["id"]]["image"]), tuple(turn["resolution"]))
        grid = tokenizer.encode(working[None])[0]
        x0, y0, x1, y1 = (v // 8 for v in turn["box"])
        gpt = next(t["value"] for t in r["conversations"] if t["value"].startswith("<vq start>"))
        assert np.array_equal(parse_vq(gpt), grid[y0:y1, x0:x1].reshape(-1))


def test_paper_resolution_same_bytes_across_batch_sizes_and_threads(tmp_path):
    """At 672 px the demo codebook has near-ties; batching and threads must still not show."""
    import torch

    args = ["expand", EXAMPLES, "--vq-resolution", "672", "--px-resolution", "16", "--targets", "vq",
            "--no-progress", "--workers", "0"]
    run_cli(*args, "--out", tmp_path / "a", "--batch-size", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        run_cli(*args, "--out", tmp_path / "b", "--batch-size", "13")
    finally:
        torch.set_num_threads(threads)
    assert data_digest(tmp_path / "a") == data_digest(tmp_path / "b")


@pytest.mark.parametrize("option", ["--workers", "--batch-size"])
def test_huge_workers_or_batch_size_are_refused(tmp_path, option):
    """--workers 99999 started a process per chunk of input; a huge --batch-size kept every record in flight."""
    result = run_cli("expand", EXAMPLES, "--out", tmp_path / "o", *FAST, option, "99999", expect=2)
    assert option in result.output and not (tmp_path / "o").exists()


def test_llm_tokenizer_without_dry_run_is_refused_not_ignored(tmp_path):
    result = run_cli("expand", EXAMPLES, "--out", tmp_path / "o", *FAST, "--llm-tokenizer", tmp_path, expect=2)
    assert "only with --dry-run" in result.output and not (tmp_path / "o").exists()


def test_dry_run_counts_llm_tokens_of_real_turns(tmp_path):
    """Spec §4: given a tokenizer, the toolkit reports the token count of the new turns."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    llm = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    llm.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    llm.save(str(tmp_path / "tokenizer.json"))
    result = run_cli("expand", EXAMPLES, *FAST, "--dry-run", "--llm-tokenizer", tmp_path)
    facts = dict(line.split(": ", 1) for line in result.output.splitlines())
    run_cli("expand", EXAMPLES, "--out", tmp_path / "o", *FAST, "--workers", "0")
    counts = {"vq": [], "px": []}
    for r in all_records(tmp_path / "o")[:9]:  # the first 8 image records (one text-only among them)
        for human, gpt in zip(r["conversations"][::2], r["conversations"][1::2]):
            if gpt["value"].startswith(("<vq start>", "<rgb start>")):
                kind = "vq" if gpt["value"].startswith("<vq") else "px"
                counts[kind].append(len(llm.encode(human["value"] + gpt["value"], add_special_tokens=False).ids))
    assert facts["sampled_records"] == "8"
    for kind in ("vq", "px"):
        assert int(facts[f"{kind}_turn_tokens_mean"]) == round(sum(counts[kind]) / len(counts[kind]))
        assert int(facts[f"{kind}_turn_tokens_max"]) == max(counts[kind])


def test_bad_slice_is_one_line_error(tmp_path):
    result = run_cli("expand", EXAMPLES, "--out", tmp_path, *FAST, "--num-shards", "2", "--shard-index", "5", expect=2)
    assert "--shard-index 5 must be in 0..1" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("option", [["--workers", "-1"], ["--batch-size", "0"], ["--shard-size", "0"]])
def test_out_of_range_numbers_are_usage_errors(tmp_path, option):
    result = run_cli("expand", EXAMPLES, "--out", tmp_path, *FAST, *option, expect=2)
    assert option[0] in result.output and not (tmp_path / "cogalign.json").exists()


def test_duplicate_ids_beyond_64_bits_are_counted_exactly(tmp_path):
    """ids were read back with orjson, which makes floats of them: 2**70 and 2**70 + 1 counted as one
    duplicate id; report.json now keeps them exact."""
    records = json.loads(EXAMPLES.read_text())
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(dict(r, id=i)) + "\n" for r, i in zip(records, [2**70, 2**70 + 1, 2**70])))
    (tmp_path / "images").symlink_to(EXAMPLES.parent / "images")
    run_cli("expand", src, "--out", tmp_path / "out", *FAST, "--workers", "0", "--targets", "px",
            "--allow-absolute-paths")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["duplicate_ids"] == {"ids": 1, "records": 2, "examples": [2**70]}
