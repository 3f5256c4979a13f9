"""What `expand` writes, per format: exact values, the dataset card, size estimates (issue 7)."""
from __future__ import annotations

import json
import shutil

import pytest

from cogalign.expand.writer import read_shard
from helpers import EXAMPLES, FAST, run_cli

BIG = 2**70 + 1


def records_with_odd_values() -> list:
    """An image record and a text-only record whose keys stray from LLaVA's: big integers,
    an integer id, a list image, extra turn keys, extra top-level keys."""
    return [
        {"id": BIG, "image": ["images/astronaut.png"], "source": {"n": -BIG, "f": 0.5},
         "conversations": [{"from": "human", "value": "<image>\nWhat is it?", "weight": BIG},
                           {"from": "gpt", "value": "An astronaut."}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
         "big": [BIG, -(2**64)]},
        {"id": "plain", "image": "images/coins.png",
         "conversations": [{"from": "human", "value": "<image>\nCoins?"}, {"from": "gpt", "value": "Yes."}]},
    ]


def write_input(tmp_path, records, fmt="json"):
    folder = tmp_path / "in"
    shutil.copytree(EXAMPLES.parent / "images", folder / "images")
    path = folder / f"data.{fmt}"
    text = json.dumps(records) if fmt == "json" else "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text)
    return path


def expand(tmp_path, records, fmt):
    """`expand` `records` (written as a JSON input) to `tmp_path / "out"` in `fmt`; the output folder."""
    out = tmp_path / "out"
    run_cli("expand", write_input(tmp_path, records), "--out", out, *FAST, "--workers", "0", "--format", fmt)
    return out


def output_records(out):
    return [r for f in sorted((out / "data").iterdir()) for r in read_shard(f)]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "json"])
def test_integers_beyond_64_bits_are_kept_exactly(tmp_path, fmt):
    source = records_with_odd_values()
    out = expand(tmp_path, source, fmt)
    got = output_records(out)
    assert [r["id"] for r in got] == [BIG, "text", "plain"]
    assert got[0]["source"] == {"n": -BIG, "f": 0.5} and got[0]["conversations"][0]["weight"] == BIG
    assert got[1] == source[1]  # text-only, passed through unchanged
    if fmt != "parquet":
        merged = out / f"data_cogalign.{fmt}"
        text = merged.read_text()
        values = json.loads(text) if fmt == "json" else [json.loads(line) for line in text.splitlines()]
        assert values == got
    report = json.loads((out / "report.json").read_text())
    assert report["expanded"] == 2 and report["passed"] == 1


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_lone_surrogate_is_rejected_the_same_in_both_input_formats(tmp_path, fmt):
    source = records_with_odd_values()[1:]
    folder = tmp_path / "in"
    folder.mkdir()
    lines = [json.dumps(r) for r in source]
    lines.insert(1, '{"id": "bad\\ud800", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}')
    path = folder / f"data.{fmt}"
    path.write_text("[" + ",".join(lines) + "]" if fmt == "json" else "\n".join(lines) + "\n")
    shutil.copytree(EXAMPLES.parent / "images", folder / "images")
    out = tmp_path / "out"
    run_cli("expand", path, "--out", out, *FAST, "--workers", "0")
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["index"], r["reason"]) for r in rejects] == [(1, "invalid_json")]
    assert [r["id"] for r in output_records(out)] == ["text", "plain"]


def uniform_odd_records() -> list:
    """Records that stray from LLaVA's keys in the same way (JSON types agree between records):
    an integer id, a list image, extra turn keys, an extra key in one record only."""
    return [
        {"id": 1, "image": ["images/astronaut.png"], "source": "coco",
         "conversations": [{"from": "human", "value": "<image>\nWhat is it?", "weight": 2},
                           {"from": "gpt", "value": "An astronaut.", "weight": 1}]},
        {"id": 2, "image": ["images/coins.png"],
         "conversations": [{"from": "human", "value": "<image>\nCoins?", "weight": 1},
                           {"from": "gpt", "value": "Yes.", "weight": 1}]},
        {"id": 3, "conversations": [{"from": "human", "value": "Hi", "weight": 1},
                                    {"from": "gpt", "value": "Hello", "weight": 1}]},
    ]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "json"])
def test_dataset_card_matches_each_format(tmp_path, fmt):
    """`datasets.load_dataset(OUT)` reads the output through its card, whatever the format."""
    import datasets

    source = uniform_odd_records()
    out = expand(tmp_path, source, fmt)
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.num_rows == 3
    rows = ds.to_list()
    if fmt == "parquet":
        from cogalign.expand.writer import from_row
        rows = [from_row(r) for r in rows]
        assert rows == output_records(out)
        assert json.loads(ds[0]["extra"])["id"] == 1
    else:
        assert [r["id"] for r in rows] == [1, 2, 3]
        assert rows[0]["source"] == "coco" and rows[1]["source"] is None
        assert rows[0]["image"] == ["images/astronaut.png"]
        assert rows[2]["conversations"] == [dict(t) for t in source[2]["conversations"]]
        assert rows[0]["cogalign"]["turns"][0]["kind"] in ("vq", "px")
        got, want = rows[0]["conversations"], output_records(out)[0]["conversations"]
        assert [{k: v for k, v in t.items() if v is not None} for t in got] == want  # extra turn keys kept


@pytest.mark.parametrize("fmt,tolerance", [("parquet", 0.25), ("jsonl", 0.10), ("json", 0.10)])
def test_dry_run_estimate_is_near_the_real_output_size(tmp_path, fmt, tolerance):
    """--dry-run builds a few real records and sizes them in the output format (parquet compressed;
    json/jsonl counted twice: shards plus the merged file); the estimate lands within the tolerance."""
    res = ["--vq-resolution", "64", "--px-resolution", "64", "--no-progress", "--format", fmt]
    dry = run_cli("expand", EXAMPLES, "--out", tmp_path / "dry", *res, "--dry-run").output
    number, unit = dict(line.split(": ", 1) for line in dry.splitlines() if ": " in line)["estimated_output_bytes"].split()
    estimate = float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
    out = tmp_path / "out"
    run_cli("expand", EXAMPLES, "--out", out, *res, "--workers", "0")
    real = sum(f.stat().st_size for f in (out / "data").iterdir()) + \
        sum(f.stat().st_size for f in out.glob(f"*_cogalign.{fmt}"))
    assert abs(estimate - real) <= tolerance * real, (estimate, real)


@pytest.mark.parametrize("embed", [False, True])
def test_load_dataset_with_and_without_embedded_images(tmp_path, embed):
    """--embed-images: the image column is a datasets Image holding the source file's bytes, so the
    output loads and decodes with the image folder gone; without it, `image` is the path."""
    import datasets
    from PIL import Image

    src = write_input(tmp_path, records_with_odd_values())
    out = tmp_path / "out"
    run_cli("expand", src, "--out", out, *FAST, "--workers", "0", *(["--embed-images"] if embed else []))
    shutil.rmtree(src.parent / "images")
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.num_rows == 3
    card = (out / "README.md").read_text()
    if embed:
        assert "dtype: image" in card
        first, text, last = ds[0], ds[1], ds[2]
        assert isinstance(last["image"], Image.Image) and last["image"].size == (384, 303)
        original = Image.open(EXAMPLES.parent / "images" / "coins.png")
        assert last["image"].tobytes() == original.tobytes()  # the file's own bytes, not a re-encoding
        assert first["image"].size == Image.open(EXAMPLES.parent / "images" / "astronaut.png").size
        assert text["image"] is None
        # the records come back as they were, paths included
        assert [r.get("image") for r in output_records(out)] == [["images/astronaut.png"], None, "images/coins.png"]
    else:
        assert "dtype: image" not in card and ds[2]["image"] == "images/coins.png"


def test_embedded_row_groups_are_cut_by_image_bytes(tmp_path):
    """Row groups stay under the size limit when the images are most of the bytes."""
    import pyarrow.parquet as pq

    from cogalign.expand.writer import ParquetShardWriter

    data = (EXAMPLES.parent / "images" / "coins.png").read_bytes()
    path = tmp_path / "data" / "x.parquet"
    path.parent.mkdir()
    writer = ParquetShardWriter(path, row_group_bytes=3 * len(data) + 100, embed_images=True)
    for i in range(10):
        writer.write({"id": str(i), "image": "coins.png", "conversations": [{"from": "human", "value": "<image>"},
                                                                             {"from": "gpt", "value": "x"}]}, data)
    writer.close()
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 10 and meta.num_row_groups == 4  # 3 + 3 + 3 + 1


def test_embed_images_needs_parquet(tmp_path):
    result = run_cli("expand", EXAMPLES, "--out", tmp_path, "--format", "jsonl", "--embed-images", expect=2)
    assert "--embed-images needs --format parquet" in result.output
