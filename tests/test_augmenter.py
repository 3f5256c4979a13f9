"""The per-record public API (issue 17, section 1): `cogalign.Augmenter` gives `cogalign expand`'s
records byte for byte, record by record, inside `datasets.map` and a `DataLoader`."""
import io
import os
import json
import pickle
import re
import subprocess
import sys
import types
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cogalign
from cogalign import Augmenter, ExpandOptions, RecordError, Runtime, run_expand
from cogalign.errors import CogalignError
from cogalign.expand.worker import EXPAND, WorkerContext, finish, prepare
from cogalign.expand.writer import dumps
from helpers import EXAMPLES, REPO

ROOT = EXAMPLES.parent
RECORDS = json.loads(EXAMPLES.read_text())
OPTIONS = ExpandOptions(vq_resolution=64, px_resolution=16, format="jsonl")
BAD = [{"id": "missing", "image": "images/nope.png", "conversations": RECORDS[0]["conversations"]},
       {"id": "shape", "image": "images/camera.png", "conversations": "not a list"},
       {"id": "index", "image": "images/camera.png", "cogalign_index": -2, "conversations": RECORDS[0]["conversations"]}]


def _expand(tmp: Path, records: list, options=OPTIONS) -> tuple[list[bytes], list[dict]]:
    """expand's output lines in input order (rejects dropped) and its rejects."""
    src = tmp / "in.json"
    src.write_text(json.dumps(records))
    run_expand(src, tmp / "out", options, Runtime(workers=0, progress=False), image_root=ROOT)
    lines = b"".join(p.read_bytes() for p in sorted((tmp / "out" / "data").glob("*.jsonl"))).splitlines()
    rejects = [json.loads(line) for line in (tmp / "out" / "rejects.jsonl").read_text().splitlines()]
    return lines, rejects


@pytest.fixture(autouse=True)
def _keep_os_environ(monkeypatch):
    """`datasets.Dataset.map(num_proc>1)` rebinds `os.environ` to a plain copy (datasets 4.x), which
    cuts later tests' `CliRunner(env=...)` off from rich's console: put the real one back."""
    monkeypatch.setattr(os, "environ", os.environ)


@pytest.fixture(scope="module")
def expanded(tmp_path_factory):
    return _expand(tmp_path_factory.mktemp("expand"), RECORDS + BAD)


@pytest.fixture(scope="module")
def aug():
    return Augmenter(OPTIONS, image_root=ROOT, device="cpu")


def test_add_turns_is_expand_byte_for_byte(expanded, aug):
    lines, rejects = expanded
    assert len(lines) == len(RECORDS)
    assert [dumps(aug.add_turns(r, i)) for i, r in enumerate(RECORDS)] == lines
    assert [dumps(r) for r in aug.add_turns_batch(RECORDS, range(len(RECORDS)))] == lines
    # rejects: the same reason names as rejects.jsonl, and no record that looks valid
    assert sorted((r["index"], r["reason"]) for r in rejects) == \
        [(14, "image_missing"), (15, "conversations_not_list"), (16, "cogalign_index_bad")]
    for offset, record in enumerate(BAD):
        with pytest.raises(RecordError) as info:
            aug.add_turns(record, len(RECORDS) + offset)
        assert info.value.reason == next(r["reason"] for r in rejects if r["index"] == len(RECORDS) + offset)
        assert f"record {len(RECORDS) + offset} (id {record['id']!r})" in str(info.value)
    out = aug.add_turns_batch(BAD + RECORDS[:1], [14, 15, 16, 0], errors="return")
    assert [e.reason for e in out[:3]] == ["image_missing", "conversations_not_list", "cogalign_index_bad"]
    assert dumps(out[3]) == lines[0]


def test_text_only_record_comes_back_unchanged(aug):
    text = next(r for r in RECORDS if "image" not in r)
    assert aug.add_turns(text, 7) == text and "cogalign" not in aug.add_turns(text, 7)


def test_finish_never_stamps_a_rejected_or_passed_record(aug):
    """Item 6: a missing image raised; a text-only record got a `cogalign` key (old `finish`)."""
    ctx = aug._ctx
    missing = prepare(0, BAD[0], ctx)
    with pytest.raises(RecordError, match="image_missing"):
        finish(missing, [], ctx)
    text = next(r for r in RECORDS if "image" not in r)
    assert finish(prepare(0, text, ctx), [], ctx) == text


class _Row(Mapping):
    """A read-only Mapping like `datasets`' LazyRow."""

    def __init__(self, data):
        self._data = data

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)


def test_any_mapping_is_a_record(expanded, aug):
    """Item 1: `check_record` took only dicts, so a LazyRow was rejected, silently."""
    lines, _ = expanded
    assert prepare(0, _Row(RECORDS[0]), aug._ctx).outcome == EXPAND
    assert dumps(aug.add_turns(_Row(RECORDS[0]), 0)) == lines[0]
    assert dumps(aug.add_turns(types.MappingProxyType(RECORDS[1]), 1)) == lines[1]


def test_in_memory_images(expanded, aug):
    """Item 7: a path, Path, PIL.Image, array, bytes and a {bytes, path} dict give expand's record."""
    lines, _ = expanded
    for i in (0, 1):  # astronaut.png (RGB), camera.png (grey)
        record, path = RECORDS[i], ROOT / RECORDS[i]["image"]
        data = path.read_bytes()
        for image in (RECORDS[i]["image"], path, Path(RECORDS[i]["image"]), data, {"bytes": data, "path": None},
                      {"bytes": None, "path": RECORDS[i]["image"]}, Image.open(path), np.asarray(Image.open(path))):
            assert dumps(aug.add_turns(record, i, image=image)) == lines[i], type(image)
        # a datasets Image column ({bytes, path} in the record): kept as expand keeps it, by its path
        assert dumps(aug.add_turns({**record, "image": {"bytes": data, "path": record["image"]}}, i)) == lines[i]
        assert dumps(aug.add_turns({**record, "image": Image.open(path)}, i)["conversations"]) == \
            dumps(json.loads(lines[i])["conversations"])
    with pytest.raises(RecordError) as info:
        aug.add_turns(RECORDS[0], 0, image=np.zeros((8, 8, 3), np.float32))
    assert info.value.reason == "image_bad_type" and "255" in str(info.value)


def test_provenance_follows_the_tokenizer(aug, tmp_path):
    """Item 4: provenance came from ExpandOptions; after `set_encoder_mode("bf16")` it still said fp32."""
    own = Augmenter(OPTIONS, image_root=ROOT, device="cpu")
    before = own.add_turns(RECORDS[0], 0)["cogalign"]
    assert before["vq_encoder"]["precision"] == "fp32" and before["tokenizer"] == own.tokenizer.name
    assert before["tokenizer_hash"] == own.tokenizer.content_hash and before["templates_hash"] == own.sampler.content_hash
    own.tokenizer.set_encoder_mode("bf16")
    after = own.add_turns(RECORDS[0], 0)["cogalign"]
    assert after["vq_encoder"] == {"precision": "bf16", "layout": "contiguous", "compile": False}
    assert own.identity()["precision"] == "bf16"
    # the templates actually used, from options.templates (item 5: the sampler default ignored it)
    (tmp_path / "t.yaml").write_text("px:\n  - Give the RGB values of this image.\n")
    px = Augmenter(ExpandOptions(targets="px", px_resolution=16, templates=str(tmp_path / "t.yaml")), image_root=ROOT)
    record = px.add_turns(RECORDS[0], 0)
    assert record["cogalign"]["templates_hash"] == px.sampler.content_hash != aug.sampler.content_hash
    assert any(t["value"].startswith("Give the RGB values of the") for t in record["conversations"])
    assert WorkerContext(ExpandOptions(targets="px", templates=str(tmp_path / "t.yaml")), ROOT).sampler.content_hash \
        == px.sampler.content_hash


def test_worker_context_needs_the_tokenizer_for_vq(aug):
    """Item 5: vq_factor defaulted to 1 and the tokenizer to '' in a hand-built WorkerContext."""
    with pytest.raises(CogalignError, match="for_tokenizer"):
        WorkerContext(OPTIONS, ROOT)
    ctx = WorkerContext.for_tokenizer(OPTIONS, ROOT, aug.tokenizer)
    assert ctx.vq_factor == aug.tokenizer.downsample == 8 and ctx.tokenizer["name"] == aug.tokenizer.name


def test_plan_is_expands_choices_and_cogalign_index_carries_them(expanded, aug, tmp_path):
    """Items 2 and 3: the choices follow (seed, position); a record's `cogalign_index` carries the
    position through a shuffle, in the Augmenter and in expand alike."""
    lines, _ = expanded
    for i, record in enumerate(RECORDS):
        turns = json.loads(lines[i]).get("cogalign", {}).get("turns", [])
        plans = aug.plan(record, i)
        assert [(p.kind, p.region.name, list(p.region.box), p.template_id, p.position) for p in plans] == \
            [(t["kind"], t["region"], t["box"], t["template_id"], t["position"]) for t in turns]
    order = list(range(len(RECORDS)))[::-1]
    shuffled = [{**RECORDS[i], "cogalign_index": i} for i in order]
    again, _ = _expand(tmp_path, shuffled)
    for position, (i, line) in enumerate(zip(order, again)):
        got = json.loads(line)
        assert got.get("cogalign", {}).get("turns") == json.loads(lines[i]).get("cogalign", {}).get("turns")
        assert got.get("conversations") == json.loads(lines[i])["conversations"]
        assert dumps(aug.add_turns(shuffled[position], position)) == line
    assert aug.add_turns(shuffled[0], None)["cogalign"]["index"] == order[0]


def _map(ds, aug, **kw):
    return ds.map(aug.map_fn, with_indices=True, **kw)


@pytest.mark.parametrize("batched", [True, False])
def test_datasets_map_two_processes_is_expand(expanded, aug, batched):
    datasets = pytest.importorskip("datasets")
    lines, _ = expanded
    ds = datasets.Dataset.from_list(RECORDS)
    out = _map(ds, aug, batched=batched, batch_size=4, num_proc=2)
    for i, line in enumerate(lines):
        want = json.loads(line)
        assert dumps(out[i]["conversations"]) == dumps(want["conversations"])
        assert out[i]["cogalign"] == (dumps(want["cogalign"]).decode() if "cogalign" in want else None)


def test_map_fn_fingerprint_is_stable_and_the_cache_is_reused(aug, tmp_path):
    datasets = pytest.importorskip("datasets")
    from datasets.fingerprint import Hasher

    same = Augmenter(OPTIONS, image_root=ROOT, device="cpu")
    assert Hasher.hash(aug.map_fn) == Hasher.hash(same.map_fn)
    same.tokenizer.set_encoder_mode("bf16")
    assert Hasher.hash(aug.map_fn) != Hasher.hash(same.map_fn)
    restored = pickle.loads(pickle.dumps(same))  # what num_proc workers get: the tokenizer loaded again, in bf16
    assert restored.identity() == same.identity() and restored.options == same.options
    assert dumps(restored.add_turns(RECORDS[0], 0)) == dumps(same.add_turns(RECORDS[0], 0))
    assert aug.plan({**RECORDS[0], "image": Image.open(ROOT / RECORDS[0]["image"])}, 0) == aug.plan(RECORDS[0], 0)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({k: r.get(k) for k in ("id", "image", "conversations")}) + "\n" for r in RECORDS))
    script = f"""
import datasets, json, os, sys
from cogalign import Augmenter, ExpandOptions
ds = datasets.load_dataset("json", data_files={str(src)!r}, split="train", cache_dir={str(tmp_path / "cache")!r})
aug = Augmenter(ExpandOptions(vq_resolution=64, px_resolution=16, format="jsonl"), image_root={str(ROOT)!r})
out = ds.map(aug.map_fn, with_indices=True, batched=True)
files = [f["filename"] for f in out.cache_files]
print(json.dumps([out._fingerprint, files, [os.stat(f).st_mtime_ns for f in files]]))
"""
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                                      cwd=tmp_path, env=_env()).stdout.splitlines()[-1]) for _ in range(2)]
    assert runs[0] == runs[1]  # same fingerprint, same cache file, not written again


def _env():
    import os

    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1"}


class _AddTurns:
    """A DataLoader collate_fn over (index, record) items."""

    def __init__(self, aug):
        self.aug = aug

    def __call__(self, items):
        return [dumps(r) for r in self.aug.add_turns_batch([r for _, r in items], [i for i, _ in items])]


def test_dataloader_two_workers_is_expand(expanded, aug):
    torch = pytest.importorskip("torch")
    lines, _ = expanded
    loader = torch.utils.data.DataLoader(list(enumerate(RECORDS)), batch_size=3, num_workers=2,
                                         collate_fn=_AddTurns(aug))
    assert [line for batch in loader for line in batch] == lines


def test_import_cogalign_is_cheap():
    code = "import sys, cogalign; cogalign.Augmenter; assert 'torch' not in sys.modules, 'torch'; " \
           "import cogalign.expand; assert isinstance(cogalign.expand, type(sys)); print(sorted(cogalign.__all__))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=_env())
    assert "Augmenter" in out.stdout and "RecordError" in out.stdout
    assert cogalign.RecordError is RecordError and cogalign.ExpandOptions is ExpandOptions


def _readme_blocks() -> list[str]:
    readme = (REPO / "README.md").read_text()
    start = readme.index("## In your own pipeline")
    section = readme[start:readme.index("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_pipeline_snippets_run_as_written(tmp_path, monkeypatch, capsys):
    """Every snippet of README's "In your own pipeline", as written; `# > ` lines are its output."""
    datasets = pytest.importorskip("datasets")
    blocks = _readme_blocks()
    imports = [line for b in blocks for line in b.splitlines() if "cogalign" in line and "import" in line]
    assert len(blocks) >= 5 and all(line.startswith("from cogalign import ") for line in imports)  # public names only
    (tmp_path / "examples").symlink_to(ROOT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    for block in blocks:
        expected = [line[4:] for line in block.splitlines() if line.startswith("# > ")]
        if "__main__" in block:  # spawned workers import the script again: run it as one
            (tmp_path / "snippet.py").write_text(block)
            out = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=_env(), check=True,
                                 capture_output=True, text=True).stdout
        else:
            exec(compile(block, "README.md", "exec"), {"__name__": "readme_snippet"})
            out = capsys.readouterr().out
        assert out.splitlines() == expected, block


def test_expand_honours_cogalign_index_in_a_parquet_input(expanded, tmp_path):
    """Item 2: every input kind carries the position (the parquet reader as the JSON one)."""
    datasets = pytest.importorskip("datasets")
    lines, _ = expanded
    order = [5, 0, 13, 2]
    datasets.Dataset.from_list([{**RECORDS[i], "cogalign_index": i} for i in order]).to_parquet(tmp_path / "in.parquet")
    run_expand(tmp_path / "in.parquet", tmp_path / "out", OPTIONS, Runtime(workers=0, progress=False), image_root=ROOT)
    got = [json.loads(line) for p in sorted((tmp_path / "out" / "data").glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert [(r["id"], r.get("cogalign", {}).get("turns"), r["conversations"]) for r in got] == \
        [(RECORDS[i]["id"], json.loads(lines[i]).get("cogalign", {}).get("turns"), json.loads(lines[i])["conversations"])
         for i in order]


def test_indices_of_any_integer_type_and_a_null_cogalign_index(expanded, aug):
    lines, _ = expanded
    assert dumps(aug.add_turns(RECORDS[2], np.int64(2))) == lines[2]
    out = aug.add_turns({**RECORDS[2], "cogalign_index": None}, 2)
    assert out["cogalign"] == json.loads(lines[2])["cogalign"]  # null: a column's empty cell, no index
    with pytest.raises(CogalignError, match="index="):
        aug.add_turns(RECORDS[2], None)


def test_map_fn_marks_rejects_when_asked(expanded, aug):
    datasets = pytest.importorskip("datasets")
    lines, _ = expanded
    rows = [RECORDS[0], {**BAD[0], "cogalign_index": None}]
    ds = datasets.Dataset.from_list([{k: r.get(k) for k in ("id", "image", "conversations")} for r in rows])
    with pytest.raises(RecordError, match="image_missing"):
        ds.map(aug.map_fn, with_indices=True, batched=True)
    for batched in (True, False):
        out = ds.map(aug.map_fn, with_indices=True, batched=batched, fn_kwargs={"errors": "mark"})
        assert out["cogalign_reject"][0] is None and out["cogalign_reject"][1].startswith("image_missing: record 1")
        assert out[1]["cogalign"] is None and out[1]["conversations"] == BAD[0]["conversations"]
        assert out[0]["cogalign"] == dumps(json.loads(lines[0])["cogalign"]).decode()


def test_a_stream_over_two_files_and_two_workers_keeps_expands_choices(expanded, aug, tmp_path, monkeypatch):
    """Item 2: in a stream read by 2 DataLoader workers, `with_indices` restarts in each worker; the
    records' `cogalign_index` keeps every record's turns and provenance those of `expand`."""
    datasets = pytest.importorskip("datasets")
    torch = pytest.importorskip("torch")
    lines, _ = expanded
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    files = []
    for part, (start, stop) in enumerate(((0, 7), (7, len(RECORDS)))):
        files.append(str(tmp_path / f"part{part}.jsonl"))
        Path(files[-1]).write_text("".join(json.dumps({**RECORDS[i], "cogalign_index": i}) + "\n" for i in range(start, stop)))
    stream = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
    stream = stream.map(aug.map_fn, batched=True, batch_size=3)
    rows = list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2))  # a file per worker
    assert sorted(row["cogalign_index"] for row in rows) == list(range(len(RECORDS)))
    for row in rows:
        want = json.loads(lines[row["cogalign_index"]])
        assert row["cogalign"] == (dumps(want["cogalign"]).decode() if "cogalign" in want else None)
        assert dumps(row["conversations"]) == dumps(want["conversations"])


# -- an outside check (helper c2): records and rows a data engineer brings --------------------------------------

TEXT = next(r for r in RECORDS if "image" not in r)
TWO = [{"from": "human", "value": "<image>\n<image>\nCompare them."}, {"from": "gpt", "value": "Two photos."}]


def test_an_image_given_for_a_record_without_one_is_not_spliced_in(aug):
    """A text-only or video record with `image=` came back with VQ/RGB turns about an image it does not
    name (no `image` key, no `<image>` token): a record that looks valid but is not. It is passed
    (or rejected) as expand passes it, and `plan` agrees."""
    path = ROOT / RECORDS[0]["image"]
    for record in (TEXT, {**TEXT, "image": None}, {**RECORDS[0], "video": "v.mp4", "image": None},
                   {**RECORDS[0], "image": None}):
        if "<image>" in json.dumps(record["conversations"]) and record.get("video") is None:
            with pytest.raises(RecordError, match="image_token_without_image"):
                aug.add_turns(record, 3, image=path)
        else:
            assert aug.add_turns(record, 3, image=path) == record
            assert aug.add_turns_batch([record], [3], [Image.open(path)]) == [record]
            assert aug.plan(record, 3) == []


def _two_images(data):
    return {"id": "two", "image": data, "conversations": TWO}


def test_a_list_of_images_in_a_datasets_column_is_read_as_expand_reads_it(aug, tmp_path):
    """`datasets.Sequence(Image())` rows (several images, as PIL images or {bytes, path} dicts) were
    rejected as image_bad_type; expand reads the same parquet and expands them."""
    datasets = pytest.importorskip("datasets")
    names = [RECORDS[0]["image"], RECORDS[1]["image"]]
    structs = [{"bytes": (ROOT / n).read_bytes(), "path": n} for n in names]
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Sequence(datasets.Image()),
                                  "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}]})
    datasets.Dataset.from_list([_two_images(structs)], features=features).to_parquet(tmp_path / "in.parquet")
    run_expand(tmp_path / "in.parquet", tmp_path / "out", OPTIONS, Runtime(workers=0, progress=False), image_root=ROOT)
    want = json.loads(next((tmp_path / "out" / "data").glob("*.jsonl")).read_text())
    assert len(want["conversations"]) == 6
    assert dumps(aug.add_turns(_two_images(names), 0)) == dumps(want)
    assert dumps(aug.add_turns(_two_images(structs), 0)) == dumps(want)
    assert aug.add_turns(_two_images([Image.open(ROOT / n) for n in names]), 0)["cogalign"] == want["cogalign"]
    assert aug.plan(_two_images([Image.open(ROOT / n) for n in names]), 0) == aug.plan(_two_images(names), 0)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "in.parquet"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    for column in (ds, ds.cast_column("image", datasets.Sequence(datasets.Image(decode=False)))):
        row = column.map(aug.map_fn, with_indices=True, batched=True)[0]
        assert row["cogalign"] == dumps(want["cogalign"]).decode()
        assert dumps(row["conversations"]) == dumps(want["conversations"])


def test_an_empty_image_struct_is_no_image_as_in_expand(aug):
    """A `{bytes: None, path: None}` cell (a parquet Image column's text-only row) was rejected as
    image_bad_type; expand reads it as no image: text-only passes, an `<image>` token is rejected."""
    empty = {"bytes": None, "path": None}
    assert aug.add_turns({**TEXT, "image": empty}, 3)["conversations"] == TEXT["conversations"]
    assert "cogalign" not in aug.add_turns({**TEXT, "image": empty}, 3)
    assert aug.plan({**TEXT, "image": empty}, 3) == []
    with pytest.raises(RecordError, match="image_token_without_image"):
        aug.add_turns({**RECORDS[0], "image": empty}, 0)
    assert aug.add_turns({**TEXT, "image": [empty]}, 3)["conversations"] == TEXT["conversations"]


def test_map_fn_tells_a_batch_from_a_row_whatever_the_rows_hold(expanded, aug):
    """Without `with_indices` (the rows carry `cogalign_index`), a batch whose first row had null
    `conversations`, or a row whose `conversations` was empty, was taken for the other kind: datasets
    stopped with a TypeError / IndexError. Chat-format rows (`messages`) were taken for one row."""
    datasets = pytest.importorskip("datasets")
    lines, _ = expanded
    rows = [{**RECORDS[0], "conversations": None}, RECORDS[1], {**RECORDS[2], "conversations": []}, RECORDS[3]]
    ds = datasets.Dataset.from_list([{**{k: r.get(k) for k in ("id", "image", "conversations")}, "cogalign_index": i}
                                     for i, r in enumerate(rows)])
    for batched in (True, False):
        out = ds.map(aug.map_fn, batched=batched, batch_size=2, fn_kwargs={"errors": "mark"})
        assert [(r or "").split(":")[0] for r in out["cogalign_reject"]] == \
            ["conversations_not_list", "", "conversations_empty", ""]
        assert [out[i]["cogalign"] for i in (1, 3)] == [dumps(json.loads(lines[i])["cogalign"]).decode() for i in (1, 3)]
    chat = {"id": ["a", "b"], "image": [RECORDS[0]["image"], "images/nope.png"], "cogalign_index": [0, 1],
            "messages": [[{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A photo."}]] * 2}
    out = aug.map_fn(chat, errors="mark")
    assert out["cogalign_reject"][0] is None and out["cogalign_reject"][1].startswith("image_missing")
    assert len(out["conversations"][0]) == 6 and out["conversations"][1] is None  # a reject keeps no turns of its own


@pytest.mark.parametrize("index", [-1, 2**63, "3", 3.0, True])
def test_a_bad_index_is_one_line_naming_index(aug, index):
    """index=-1 came back as an `internal_error` RecordError carrying a traceback; "3" and 3.0 as a bare
    TypeError; 2**63 made a record whose provenance JSON cannot hold its index."""
    with pytest.raises(CogalignError) as info:
        aug.add_turns(RECORDS[0], index)
    message = str(info.value)
    assert not isinstance(info.value, RecordError) and "\n" not in message and "Traceback" not in message
    assert f"index={index!r}" in message and "from 0 to" in message
    with pytest.raises(CogalignError, match="index="):
        aug.add_turns_batch([RECORDS[0]], [index], errors="return")
    with pytest.raises(CogalignError, match="index="):
        aug.plan(RECORDS[0], index)


def test_an_expanded_record_is_not_expanded_again(expanded, aug, tmp_path):
    """expand's own output, read back (by expand, or by `datasets` then the Augmenter), got a second set
    of turns while its provenance listed only the new ones: the first turns were unaccounted for."""
    datasets = pytest.importorskip("datasets")
    lines, _ = expanded
    again = [json.loads(line) for line in lines[:3]]
    with pytest.raises(RecordError, match="already_expanded"):
        aug.add_turns(again[0], 0)
    ds = datasets.Dataset.from_list([{**r, "cogalign": dumps(r["cogalign"]).decode()} for r in again])
    out = ds.map(aug.map_fn, with_indices=True, batched=True, fn_kwargs={"errors": "mark"})
    assert all(reason.startswith("already_expanded") for reason in out["cogalign_reject"])
    assert out["conversations"] == [r["conversations"] for r in again] and out["cogalign"] == ds["cogalign"]
    _, rejects = _expand(tmp_path, again)
    assert [r["reason"] for r in rejects] == ["already_expanded"] * 3
    # `validate` (a gate before training: its input may be expand's output) still accepts them
    from cogalign.expand.validate import validate

    checked = validate(tmp_path / "in.json", OPTIONS, image_root=ROOT, workers=0, progress=False)
    assert checked.counts["reject"] == 0 and checked.counts["expand"] == 3


def test_tokenizer_option_errors_name_the_python_parameters():
    """From Python, `vq_precision="fp16"` on the CPU said "--precision fp16 is refused ... use --precision
    bf16": flags the caller never passed. The CLI keeps its flags (`cli_message`)."""
    from cogalign.cli.util import error_text

    with pytest.raises(CogalignError) as info:
        Augmenter(ExpandOptions(vq_precision="fp16", vq_resolution=64, px_resolution=16), image_root=ROOT, device="cpu")
    assert "vq_precision fp16 is refused on the CPU" in str(info.value) and "--" not in str(info.value)
    assert "--precision fp16" in error_text(info.value) and "\n" not in str(info.value)


def test_a_batch_of_columns_is_refused_in_one_line(aug):
    """`add_turns_batch(ds[0:3], range(3))` (a `datasets` slice is a dict of columns) was read as one
    record per column name: '2 records, 3 indices' or each name rejected as `not_an_object`."""
    columns = {"id": [r.get("id") for r in RECORDS[:3]], "image": [r.get("image") for r in RECORDS[:3]],
               "conversations": [r["conversations"] for r in RECORDS[:3]]}
    for indices in (range(3), None):
        with pytest.raises(CogalignError, match="columns") as info:
            aug.add_turns_batch(columns, indices, errors="return")
        assert "map_fn" in str(info.value) and not isinstance(info.value, RecordError)


def test_a_relative_image_root_is_the_folder_it_named_when_made(expanded, tmp_path, monkeypatch):
    """A relative `image_root` was resolved at each call against the current folder: after a chdir (or in
    a process started elsewhere, once pickled) the same Augmenter rejected every record as image_missing."""
    lines, _ = expanded
    monkeypatch.chdir(ROOT.parent)
    made = Augmenter(ExpandOptions(targets="px", px_resolution=16, format="jsonl"), image_root=ROOT.name)
    monkeypatch.chdir(tmp_path)
    for copy in (made, pickle.loads(pickle.dumps(made))):
        out = copy.add_turns(RECORDS[0], 0)
        assert [t["value"] for t in out["conversations"]] and out["cogalign"]["turns"][0]["kind"] == "px"


def _chat(images):
    return {"id": "chat", "images": images,
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "A photo."}]}]}


def test_chat_records_with_images_in_memory_and_their_plan_are_expands(aug, tmp_path):
    """The TRL / HF chat layout (`messages`, `images` as a datasets Image list): `plan` refused every chat
    record (conversations_missing) that add_turns and expand expand, and rows whose `images` held
    PIL images or {bytes, path} dicts were rejected (image_token_without_image); expand reads that parquet."""
    datasets = pytest.importorskip("datasets")
    name = RECORDS[0]["image"]
    struct = {"bytes": (ROOT / name).read_bytes(), "path": name}
    datasets.Dataset.from_list([_chat([struct])]).cast_column("images", datasets.Sequence(datasets.Image())) \
        .to_parquet(tmp_path / "in.parquet")
    run_expand(tmp_path / "in.parquet", tmp_path / "out", OPTIONS, Runtime(workers=0, progress=False), image_root=ROOT)
    want = json.loads(next((tmp_path / "out" / "data").glob("*.jsonl")).read_text())
    turns = [(t["kind"], t["region"], t["template_id"], t["position"]) for t in want["cogalign"]["turns"]]
    for images in ([name], [struct], [Image.open(ROOT / name)], [np.asarray(Image.open(ROOT / name))]):
        out = aug.add_turns(_chat(images), 0)
        assert out["cogalign"] == want["cogalign"] and out["conversations"] == want["conversations"], type(images[0])
        assert [(p.kind, p.region.name, p.template_id, p.position) for p in aug.plan(_chat(images), 0)] == turns
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "in.parquet"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    row = ds.map(aug.map_fn, with_indices=True, batched=True)[0]
    assert row["cogalign"] == dumps(want["cogalign"]).decode() and row["conversations"] == want["conversations"]


def test_map_fn_without_positions_says_with_indices(aug):
    """`ds.map(aug.map_fn)` without `with_indices` nor a `cogalign_index` column was told to pass
    `index=`, which map_fn never takes."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{k: r.get(k) for k in ("id", "image", "conversations")} for r in RECORDS[:2]])
    for batched in (True, False):
        with pytest.raises(CogalignError, match=r"with_indices=True") as info:
            ds.map(aug.map_fn, batched=batched)
        assert "cogalign_index" in str(info.value) and "index=)" not in str(info.value)


def test_the_fingerprint_follows_the_templates_content(tmp_path):
    """An Augmenter hashed as its options, which name the templates file, not its content: after an
    edit of that file `datasets` reused the cached rows made with the old templates."""
    from datasets.fingerprint import Hasher

    templates = tmp_path / "t.yaml"
    templates.write_text("px:\n  - Give the RGB values of this image.\n")
    options = ExpandOptions(targets="px", px_resolution=16, templates=str(templates))
    before = Augmenter(options, image_root=ROOT)
    assert Hasher.hash(before.map_fn) == Hasher.hash(Augmenter(options, image_root=ROOT).map_fn)
    templates.write_text("px:\n  - List the RGB values of this image.\n")
    after = Augmenter(options, image_root=ROOT)
    assert Hasher.hash(after.map_fn) != Hasher.hash(before.map_fn)
    with pytest.raises(CogalignError, match="templates"):  # a copy made now would not write what `before` writes
        pickle.loads(pickle.dumps(before))
    assert pickle.loads(pickle.dumps(after)).add_turns(RECORDS[0], 0) == after.add_turns(RECORDS[0], 0)


def test_options_that_pin_a_tokenizer_or_templates_hash_are_held_to_it(tmp_path):
    """Options rebuilt from a run's cogalign.json pin `tokenizer_hash` and `templates_hash`; another
    tokenizer or templates file was used silently, so records differed from the run's."""
    options = ExpandOptions(vq_resolution=64, px_resolution=16, format="jsonl")
    aug = Augmenter(options, image_root=ROOT)
    pinned = options.replace(tokenizer_hash=aug.tokenizer.content_hash, templates_hash=aug.sampler.content_hash)
    assert Augmenter(pinned, image_root=ROOT).add_turns(RECORDS[0], 0) == aug.add_turns(RECORDS[0], 0)
    for changes, name in (({"tokenizer_hash": "0" * 16}, "tokenizer_hash"), ({"templates_hash": "0" * 16}, "templates_hash")):
        with pytest.raises(CogalignError, match=name):
            Augmenter(pinned.replace(**changes), image_root=ROOT)
        with pytest.raises(CogalignError, match=name):
            run_expand(EXAMPLES, tmp_path / name, pinned.replace(**changes), Runtime(workers=0, progress=False))
        assert not (tmp_path / name / "data").exists()


def test_output_features_keep_a_late_provenance_or_reject(aug):
    """datasets types a new column from the first batch it writes: when that batch held only text-only
    records (`cogalign` all None) or no reject (`cogalign_reject` all None), the column was fixed as null
    and the first later value stopped the map with a TypeError. `output_features` gives the types."""
    datasets = pytest.importorskip("datasets")
    text = next(i for i, r in enumerate(RECORDS) if "image" not in r)
    order = [text, text, 0, 1]
    rows = [{k: RECORDS[i].get(k) for k in ("id", "image", "conversations")} for i in order]
    rows.append({**rows[2], "image": "images/nope.png"})
    ds = datasets.Dataset.from_list(rows)
    for batched in (True, False):
        kwargs = dict(with_indices=True, batched=batched, fn_kwargs={"errors": "mark"}, writer_batch_size=2)
        if batched:
            kwargs["batch_size"] = 2
        out = ds.map(aug.map_fn, features=aug.output_features(ds.features, errors="mark"), **kwargs)
        for position in range(len(order)):
            want = aug.add_turns(rows[position], position)
            assert out[position]["cogalign"] == (dumps(want["cogalign"]).decode() if "cogalign" in want else None)
            assert dumps(out[position]["conversations"]) == dumps(want["conversations"])
        assert out["cogalign_reject"][:4] == [None] * 4 and out["cogalign_reject"][4].startswith("image_missing")
        assert out.features["cogalign"] == datasets.Value("string")
    assert aug.output_features(None) is None  # a stream of unknown features
