"""Issue 14: which files `export` and `show` may write (never the run's input, its images, or a file they
did not write without --overwrite), export formats that follow their extension, image paths that point
somewhere, and images a run must not lose (several per record, embedded bytes)."""
from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cogalign.inputs.turns import to_llava
from helpers import EXAMPLES, FAST, run_cli
from tests.helpers import one_line_error  # noqa: E402

IMAGES = EXAMPLES.parent / "images"
GOOD = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run on a copy of the examples: (its input file, its output folder)."""
    base = tmp_path_factory.mktemp("files")
    shutil.copytree(IMAGES, base / "d4" / "images")
    src = base / "d4" / "base.json"
    shutil.copy(EXAMPLES, src)
    run_cli("expand", src, "--out", base / "out", *FAST, "--workers", "0", "--format", "jsonl")
    return src, base / "out"


# ------------------------------------------------------------------ export never replaces what it did not write

def test_export_never_replaces_the_runs_input(run, tmp_path, monkeypatch):
    src, out = run
    before = src.read_bytes()
    for extra in ([], ["--overwrite"]):
        result = run_cli("export", out, "--to", "llava-json", "--out", src, *extra, expect=2)
        one_line_error(result, "input the run", str(src))
    monkeypatch.chdir(src.parent)  # the same file named relative to another folder
    result = run_cli("export", out, "--to", "llava-json", "--out", "base.json", "--overwrite", expect=2)
    one_line_error(result, "input the run")
    assert src.read_bytes() == before
    assert run_cli("export", out, "--to", "llava-json", "--out", tmp_path / "x.json", "--no-progress").exit_code == 0


def test_export_replaces_an_existing_file_only_with_overwrite(run, tmp_path):
    _, out = run
    dest = tmp_path / "mine.json"
    dest.write_text("my data")
    one_line_error(run_cli("export", out, "--to", "llava-json", "--out", dest, expect=2), "exists", "--overwrite")
    assert dest.read_text() == "my data"
    rejects = tmp_path / "new.json.rejects.jsonl"
    rejects.write_text("my notes")
    one_line_error(run_cli("export", out, "--to", "llava-json", "--out", tmp_path / "new.json", expect=2),
                   "--rejects", "exists")
    assert rejects.read_text() == "my notes" and not (tmp_path / "new.json").exists()
    run_cli("export", out, "--to", "llava-json", "--out", dest, "--overwrite", "--no-progress")
    assert len(json.loads(dest.read_text())) == 14


def test_export_never_writes_over_dataset_info_or_an_entry_it_did_not_write(run, tmp_path):
    _, out = run
    info = tmp_path / "dataset_info.json"
    theirs = {"sg": {"file_name": "elsewhere.json", "formatting": "sharegpt"}}
    info.write_text(json.dumps(theirs))
    for extra in ([], ["--overwrite"]):
        result = run_cli("export", out, "--to", "sharegpt", "--out", info, *extra, expect=2)
        one_line_error(result, "dataset_info.json")
    result = run_cli("export", out, "--to", "sharegpt", "--out", tmp_path / "sg.json", expect=2)
    one_line_error(result, "entry 'sg'", "did not write")
    assert json.loads(info.read_text()) == theirs and not (tmp_path / "sg.json").exists()
    # its own entry it may replace: export twice to the same file
    for extra in ([], ["--overwrite"]):
        run_cli("export", out, "--to", "sharegpt", "--out", tmp_path / "cog.json", "--no-progress", *extra)
    entries = json.loads(info.read_text())
    assert entries["sg"] == theirs["sg"] and entries["cog"]["file_name"] == "cog.json"


# ------------------------------------------------------------------ formats, folders, keys, text

@pytest.mark.parametrize("fmt, name", [("llava-jsonl", "x.json"), ("llava-json", "x.jsonl"),
                                       ("sharegpt", "x.txt"), ("messages", "x")])
def test_export_format_follows_the_extension(run, tmp_path, fmt, name):
    _, out = run
    result = run_cli("export", out, "--to", fmt, "--out", tmp_path / name, expect=2)
    one_line_error(result, fmt, ".json")
    assert not list(tmp_path.iterdir())


def test_image_folder_that_does_not_exist_is_one_line(run, tmp_path):
    _, out = run
    result = run_cli("export", out, "--to", "llava-json", "--out", tmp_path / "x.json", "--image-folder",
                     tmp_path / "nonexistent", expect=2)
    one_line_error(result, "--image-folder", "no such folder")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("text", ["<image>\nWhat is it?", "What is it?\n<image>", "Compare\n<image>\nwith\n<image>",
                                  "<image>\n<image>\nBoth?"])
def test_messages_parts_read_back_to_the_same_text(text):
    from cogalign.hub.export import ImagePaths, convert

    images = ["a.png"] * text.count("<image>")
    record = {"id": "r", "image": images, "conversations": [{"from": "human", "value": text},
                                                             {"from": "gpt", "value": "Yes."}]}
    exported = convert(record, "messages", ImagePaths(IMAGES, None))
    parts = exported["messages"][0]["content"]
    assert all(not p.get("text", "x").endswith("\n") for p in parts[:-1])  # no stray newline before an image
    assert to_llava(exported)[0]["conversations"][0]["value"] == text


@pytest.mark.parametrize("fmt", ["llava-jsonl", "sharegpt", "messages"])
def test_export_keeps_other_keys_unless_dropped(run, tmp_path, fmt):
    _, out = run
    work = tmp_path / "o"
    shutil.copytree(out, work)
    shard = sorted((work / "data").glob("*.jsonl"))[-1]
    with open(shard, "a") as f:
        f.write(json.dumps({"id": "extra", "image": "images/chelsea.png", "conversations": GOOD,
                            "data_source": "coco"}) + "\n")
    run_cli("export", work, "--to", fmt, "--out", tmp_path / "x.jsonl", "--no-progress")
    rows = [json.loads(line) for line in open(tmp_path / "x.jsonl")]
    assert rows[-1]["data_source"] == "coco"
    assert rows[0]["cogalign"]["turns"]  # the provenance travels with the record
    run_cli("export", work, "--to", fmt, "--out", tmp_path / "y.jsonl", "--drop-keys", "--no-progress")
    rows = [json.loads(line) for line in open(tmp_path / "y.jsonl")]
    assert "data_source" not in rows[-1] and "cogalign" not in rows[0]


# ------------------------------------------------------------------ show --out

def test_show_never_replaces_the_records_image_and_replaces_others_only_with_overwrite(run, tmp_path):
    src, out = run
    record = json.loads(src.read_text())[0]
    image = src.parent / record["image"]
    before = image.read_bytes()
    for extra in ([], ["--overwrite"]):
        result = run_cli("show", out, "--index", "0", "--out", image, *extra, expect=2)
        assert "error:" in result.output and image.read_bytes() == before
    other = src.parent / "images" / "coins.png"  # another record's image, under the run's image root
    before = other.read_bytes()
    one_line_error(run_cli("show", out, "--index", "0", "--out", other, "--overwrite", expect=2), "image root")
    assert other.read_bytes() == before
    mine = tmp_path / "panel.png"
    mine.write_bytes(b"not yours")
    one_line_error(run_cli("show", out, "--index", "0", "--out", mine, expect=2), "exists", "--overwrite")
    assert mine.read_bytes() == b"not yours"
    run_cli("show", out, "--index", "0", "--out", mine, "--overwrite")
    assert mine.read_bytes().startswith(b"\x89PNG")
    panel = src.parent / "panel.png"  # a panel show wrote, beside the input: show may replace its own
    run_cli("show", out, "--index", "0", "--out", panel)
    run_cli("show", out, "--index", "1", "--out", panel, "--overwrite")


# ------------------------------------------------------------------ inputs with embedded images

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
HUB = pa.schema([("id", pa.string()),
                 ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
                 ("image", pa.list_(IMAGE))])


def hub_input(folder, several: bool = False):
    """A Hub-style parquet whose images exist only as bytes (no image folder beside it); with `several`,
    the first record holds two images."""
    folder.mkdir(parents=True)
    rows = []
    for r in json.loads(EXAMPLES.read_text()):
        if "image" not in r:
            continue
        rows.append({"id": r["id"], "conversations": r["conversations"],
                     "image": [{"bytes": (EXAMPLES.parent / r["image"]).read_bytes(), "path": r["image"]}]})
    if several:
        rows[0]["image"].append({"bytes": (IMAGES / "coins.png").read_bytes(), "path": "images/coins.png"})
        rows[0]["conversations"][0]["value"] += "\nAnd this one?\n<image>"
    pq.write_table(pa.Table.from_pylist(rows, schema=HUB), folder / "train.parquet")
    return folder / "train.parquet", rows


def test_paths_that_point_nowhere_are_warned_of_and_never_exported(tmp_path):
    src, rows = hub_input(tmp_path / "hub")
    out = tmp_path / "out"
    result = run_cli("expand", src, "--out", out, *FAST, "--workers", "0")
    assert f"{len(rows)} of the first {len(rows)} image paths are no files" in result.output
    assert "no files" in (out / "README.md").read_text()
    result = run_cli("export", out, "--to", "llava-json", "--out", tmp_path / "x.json", "--no-progress")
    assert f"written: 0  rejected: {len(rows)}" in result.output and "image_file_missing" in result.output


def test_embedded_images_are_written_out_or_refused_with_a_reason(tmp_path):
    from PIL import Image

    src, rows = hub_input(tmp_path / "hub", several=True)
    out = tmp_path / "out"
    run_cli("expand", src, "--out", out, *FAST, "--workers", "0", "--embed-images")
    result = run_cli("export", out, "--to", "sharegpt", "--out", tmp_path / "a.json", "--no-progress")
    assert f"written: 0  rejected: {len(rows)}" in result.output and "image_embedded_only" in result.output
    folder = tmp_path / "media"
    folder.mkdir()
    result = run_cli("export", out, "--to", "sharegpt", "--out", tmp_path / "b.json", "--image-folder", folder,
                     "--no-progress", "--overwrite")
    assert f"written: {len(rows)}  rejected: 0" in result.output
    exported = json.loads((tmp_path / "b.json").read_text())
    for row, record in zip(rows, exported):
        assert [(folder / p).read_bytes() for p in record["images"]] == [im["bytes"] for im in row["image"]]
        Image.open(folder / record["images"][0]).verify()
    assert len(exported[0]["images"]) == 2


def test_every_image_of_a_record_is_kept_with_embed_images(tmp_path):
    """Images 2..n of a record were dropped: only the first had its bytes in the shard."""
    import datasets

    src, rows = hub_input(tmp_path / "hub", several=True)
    out = tmp_path / "out"
    run_cli("expand", src, "--out", out, *FAST, "--workers", "0", "--embed-images")
    ds = datasets.load_dataset(str(out), split="train")
    first = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))[0]
    assert [im["bytes"] for im in first["images"]] == [im["bytes"] for im in rows[0]["image"]]
    assert [im["path"] for im in first["images"]] == [im["path"] for im in rows[0]["image"]]
    assert all(r["images"] == [] for r in ds.select(range(1, ds.num_rows)))  # one image: in `image` only
    card = (out / "README.md").read_text()
    assert f"num_bytes: {ds.info.splits['train'].num_bytes}\n" in card  # the Arrow size, as datasets counts it


def test_auto_shard_size_counts_embedded_image_bytes(tmp_path):
    from cogalign.expand import estimate

    src, rows = hub_input(tmp_path / "hub")
    out = tmp_path / "out"
    run_cli("expand", src, "--out", out, *FAST, "--workers", "0", "--embed-images")
    shard_size = json.loads((out / "cogalign.json").read_text())["shard_size"]
    mean_image = sum(len(r["image"][0]["bytes"]) for r in rows) / len(rows)
    assert shard_size * mean_image <= estimate.SHARD_TARGET_BYTES
    assert shard_size * mean_image >= 0.5 * estimate.SHARD_TARGET_BYTES  # not needlessly small either
    plain = run_cli("expand", src, "--out", tmp_path / "plain", *FAST, "--workers", "0")
    assert plain.exit_code == 0
    assert json.loads((tmp_path / "plain" / "cogalign.json").read_text())["shard_size"] > shard_size


def test_export_overwrite_never_writes_into_an_image_folder_it_did_not_make(tmp_path):
    """--overwrite replaced a user's own <stem>-images/00000000-0.png with the output's bytes."""
    src, rows = hub_input(tmp_path / "hub")
    out = tmp_path / "out"
    run_cli("expand", src, "--out", out, *FAST, "--workers", "0", "--embed-images")
    media = tmp_path / "media"
    (media / "a-images").mkdir(parents=True)
    (media / "a-images" / "00000000-0.png").write_text("my photo")
    args = ("export", out, "--to", "llava-json", "--out", tmp_path / "a.json", "--image-folder", media, "--no-progress")
    one_line_error(run_cli(*args, "--overwrite", expect=2), "a-images", "not made by cogalign export")
    assert (media / "a-images" / "00000000-0.png").read_text() == "my photo"
    assert not (tmp_path / "a.json").exists()
    shutil.rmtree(media / "a-images")
    run_cli(*args)
    run_cli(*args, "--overwrite")  # its own folder: replaced on request
    assert len(json.loads((tmp_path / "a.json").read_text())) == len(rows)


def test_a_system_prompt_reaches_llama_factory_and_trl(tmp_path):
    """The `system` key a chat record's system turn became was written, but LLaMA-Factory's entry did not map
    it and the messages export left it outside `messages`: both trainers trained without it."""
    src = tmp_path / "in"
    shutil.copytree(IMAGES, src / "images")
    rows = [{"id": "s", "messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                                     {"role": "assistant", "content": "A cat."}], "images": ["images/chelsea.png"]},
            {"id": "n", "conversations": GOOD, "image": "images/coffee.png"}]
    (src / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    run_cli("expand", src / "chat.jsonl", "--out", out, *FAST, "--workers", "0", "--format", "jsonl")
    run_cli("export", out, "--to", "sharegpt", "--out", tmp_path / "sg.json", "--no-progress")
    entry = json.loads((tmp_path / "dataset_info.json").read_text())["sg"]
    assert entry["columns"]["system"] == "system"
    assert [r.get("system") for r in json.loads((tmp_path / "sg.json").read_text())] == ["Be brief.", None]
    run_cli("export", out, "--to", "messages", "--out", tmp_path / "m.jsonl", "--no-progress")
    first, second = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert first["messages"][0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert "system" not in first and second["messages"][0]["role"] == "user"
    assert to_llava(first)[0]["system"] == "Be brief."  # a re-import gives the same record back
    run_cli("export", out, "--to", "sharegpt", "--out", tmp_path / "sg.json", "--no-progress", "--overwrite", "--drop-keys")
    assert [r.get("system") for r in json.loads((tmp_path / "sg.json").read_text())] == ["Be brief.", None]


def test_export_overwrite_never_replaces_a_binary_file(run, tmp_path):
    """`--rejects images/brick.png --overwrite` emptied the run's own image (an empty rejects list)."""
    src, out = run
    photo = src.parent / "images" / "brick.png"
    before = photo.read_bytes()
    for option in ("--rejects", "--out"):
        dest = photo if option == "--rejects" else tmp_path / "x.json"
        if option == "--out":
            dest.write_bytes(before)  # an image saved under a .json name
        args = ["--out", tmp_path / "y.json", "--rejects", photo] if option == "--rejects" else ["--out", dest]
        one_line_error(run_cli("export", out, "--to", "llava-json", *args, "--overwrite", "--no-progress", expect=2),
                       option, "binary file")
        assert dest.read_bytes() == before
    run_cli("export", out, "--to", "llava-json", "--out", tmp_path / "z.json", "--no-progress")
    run_cli("export", out, "--to", "llava-json", "--out", tmp_path / "z.json", "--no-progress", "--overwrite")


def test_export_paths_that_cannot_be_written_are_one_line_and_leave_nothing(run, tmp_path):
    """A --out or --rejects under a file, or in a folder that cannot be written, was a traceback, and a
    failed --rejects left --out's temporary file behind."""
    _, out = run
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    for args, needle in ((["--out", a_file / "x.json"], "--out"),
                         (["--out", tmp_path / "q.json", "--rejects", a_file / "r.jsonl"], "--rejects")):
        one_line_error(run_cli("export", out, "--to", "llava-json", *args, "--no-progress", expect=2), needle, "is a file")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root may write anyway
            one_line_error(run_cli("export", out, "--to", "llava-json", "--out", locked / "x.json", expect=2), "cannot write")
    finally:
        locked.chmod(0o700)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "locked"]


def test_export_writes_no_rejects_or_images_inside_the_run_folder(tmp_path):
    """`--rejects OUT/data/r.jsonl` and `--image-folder OUT/data` wrote files among the shards."""
    src, _ = hub_input(tmp_path / "hub")
    out = tmp_path / "out"
    run_cli("expand", src, "--out", out, *FAST, "--workers", "0", "--embed-images")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    base = ("export", out, "--to", "llava-json", "--no-progress")
    one_line_error(run_cli(*base, "--out", tmp_path / "a.json", "--rejects", out / "data" / "r.jsonl", expect=2),
                   "--rejects", "outside the output folder")
    one_line_error(run_cli(*base, "--out", tmp_path / "b.json", "--image-folder", out / "data", expect=2),
                   "--image-folder", "inside the output folder")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not list(tmp_path.glob("*.json"))
