"""Inputs beyond one LLaVA file (issue 9 item 3): Hub parquet with embedded images, save_to_disk
folders, YAML mixtures, and chat-format turns."""
from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cogalign.inputs import input_files
from cogalign.inputs import count_input as count_records, iter_input as iter_records
from cogalign.expand.writer import read_shard
from helpers import EXAMPLES, FAST, run_cli

IMAGES = EXAMPLES.parent / "images"


def source_records() -> list[dict]:
    return [{**r, "data_source": "mini"} for r in json.loads(EXAMPLES.read_text())]


def hub_rows(records) -> list[dict]:
    """The lmms-lab/LLaVA-NeXT-Data layout: image as {bytes, path}, null for text-only records."""
    rows = []
    for r in records:
        image = {"bytes": (IMAGES.parent / r["image"]).read_bytes(), "path": r["image"]} if "image" in r else None
        rows.append({"id": r["id"], "conversations": r["conversations"], "data_source": r["data_source"],
                     "image": image})
    return rows


HUB_SCHEMA = pa.schema([("id", pa.string()),
                        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
                        ("data_source", pa.string()),
                        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))])


def write_hub_parquet(folder, records, files=2):
    """Several files with small row groups, as a Hub dataset folder (`data/train-*.parquet`)."""
    (folder / "data").mkdir(parents=True)
    rows = hub_rows(records)
    per = -(-len(rows) // files)
    for i in range(files):
        table = pa.Table.from_pylist(rows[i * per:(i + 1) * per], schema=HUB_SCHEMA)
        pq.write_table(table, folder / "data" / f"train-{i:05d}-of-{files:05d}.parquet", row_group_size=3)
    (folder / "README.md").write_text("someone else's card\n")
    return folder


def json_input(tmp_path, records):
    folder = tmp_path / "json"
    shutil.copytree(IMAGES, folder / "images")
    path = folder / "mini.json"
    path.write_text(json.dumps(records))
    return path


def outputs(out):
    return [r for f in sorted((out / "data").iterdir()) for r in read_shard(f)]


def digest(out):
    return {f.name: f.read_bytes() for f in sorted((out / "data").iterdir())}


def test_hub_parquet_with_embedded_images_gives_the_same_records_as_json_plus_files(tmp_path):
    records = source_records()
    hub = write_hub_parquet(tmp_path / "hub", records)
    run_cli("expand", hub, "--out", tmp_path / "a", *FAST, "--workers", "0")
    run_cli("expand", json_input(tmp_path, records), "--out", tmp_path / "b", *FAST, "--workers", "0")
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")  # byte for byte
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["input"] == 14 and report["expanded"] == 13 and report["passed"] == 1
    # with --embed-images too, and in slices that skip whole row groups
    for name, extra in (("c", []), ("d", ["--shard-size", "4", "--workers", "1"])):
        run_cli("expand", hub, "--out", tmp_path / name, *FAST, "--workers", "0", "--embed-images", *extra)
    run_cli("expand", json_input(tmp_path / "x", records), "--out", tmp_path / "e", *FAST, "--workers", "0",
            "--embed-images")
    assert outputs(tmp_path / "c") == outputs(tmp_path / "d") == outputs(tmp_path / "e") == outputs(tmp_path / "a")
    assert digest(tmp_path / "c") == digest(tmp_path / "e")


def test_embedded_bytes_get_the_same_checks_as_files(tmp_path):
    records = source_records()[:4]
    rows = hub_rows(records)
    rows[0]["image"]["bytes"] = b"GIF89a" + b"\0" * 10          # garbage behind a GIF header
    rows[1]["image"]["bytes"] = b""                              # empty
    rows[2]["image"] = {"bytes": (IMAGES / "coins.png").read_bytes(), "path": None}  # no path: named by position
    folder = tmp_path / "hub"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=HUB_SCHEMA), folder / "x.parquet")
    out = tmp_path / "out"
    run_cli("expand", folder / "x.parquet", "--out", out, *FAST, "--workers", "0", "--max-image-pixels", "200000")
    rejects = {r["index"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert rejects == {0: "image_unidentified", 1: "image_empty_file", 3: "image_too_large"}  # astronaut > 200K px
    (kept,) = outputs(out)
    assert kept["image"] == "embedded-2"
    # the same bytes as files behind a JSON file: the same outcomes
    folder = tmp_path / "files"
    folder.mkdir()
    for i, row in enumerate(rows):
        (folder / f"{i}.img").write_bytes(row["image"]["bytes"])
        records[i]["image"] = f"{i}.img"
    (folder / "x.json").write_text(json.dumps(records))
    run_cli("expand", folder / "x.json", "--out", tmp_path / "o2", *FAST, "--workers", "0", "--max-image-pixels", "200000")
    lines = (tmp_path / "o2" / "rejects.jsonl").read_text().splitlines()
    assert {r["index"]: r["reason"] for r in map(json.loads, lines)} == rejects


def test_save_to_disk_folder(tmp_path):
    import datasets

    records = source_records()
    rows = hub_rows(records)
    features = datasets.Features({"id": datasets.Value("string"),
                                  "conversations": datasets.List({"from": datasets.Value("string"),
                                                                  "value": datasets.Value("string")}),
                                  "data_source": datasets.Value("string"), "image": datasets.Image()})
    ds = datasets.Dataset.from_list(rows, features=features)
    ds.save_to_disk(str(tmp_path / "disk"), max_shard_size="200KB")
    assert len(list((tmp_path / "disk").glob("*.arrow"))) > 1
    assert count_records(tmp_path / "disk") == 14
    assert input_files(tmp_path / "disk")[-1].name == "state.json"
    run_cli("expand", tmp_path / "disk", "--out", tmp_path / "a", *FAST, "--workers", "0")
    # datasets keeps only the file name of an Image given as bytes; the same records as JSON:
    flat = [{**r, "image": r["image"].split("/")[-1]} if "image" in r else r for r in records]
    src = json_input(tmp_path, flat)
    for f in (src.parent / "images").iterdir():
        f.rename(src.parent / f.name)
    run_cli("expand", src, "--out", tmp_path / "b", *FAST, "--workers", "0")
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b")
    # a DatasetDict with one split reads the same
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    assert [r for _, r in iter_records(tmp_path / "dd")][5]["id"] == records[5]["id"]


def write_mixture(tmp_path, strategies, n=20):
    """Two LLaVA files (a JSON array and JSONL) of text-only records, and a YAML in another folder."""
    data = tmp_path / "data"
    data.mkdir()
    for name, fmt in (("a", "json"), ("b", "jsonl")):
        recs = [{"id": f"{name}{i}", "conversations": [{"from": "human", "value": f"q{i}"},
                                                        {"from": "gpt", "value": f"a{i}"}]} for i in range(n)]
        text = json.dumps(recs) if fmt == "json" else "".join(json.dumps(r) + "\n" for r in recs)
        (data / f"{name}.{fmt}").write_text(text)
    (tmp_path / "cfg").mkdir()
    yaml_path = tmp_path / "cfg" / "mix.yaml"
    lines = ["datasets:"]
    for (file, strategy) in zip(("../data/a.json", "../data/b.jsonl"), strategies):
        lines += [f"  - json_path: {file}", f"    sampling_strategy: {strategy}"]
    yaml_path.write_text("\n".join(lines) + "\n")
    return yaml_path


def ids(path, seed=0, skip=None):
    return [r["id"] for _, r in iter_records(path, seed=seed, skip=skip)]


@pytest.mark.parametrize("strategy,expect", [
    ("all", [f"a{i}" for i in range(20)]),
    ("first:3", ["a0", "a1", "a2"]),
    ("end:2", ["a18", "a19"]),
    ("first:10%", ["a0", "a1"]),
    ("end:11%", ["a17", "a18", "a19"]),  # rounded up, as LLaVA-NeXT does
])
def test_mixture_strategies(tmp_path, strategy, expect):
    path = write_mixture(tmp_path, [strategy, "first:1"])
    assert ids(path) == expect + ["b0"]
    assert count_records(path) == len(expect) + 1
    assert [p for p, _ in iter_records(path)] == list(range(len(expect) + 1))


@pytest.mark.parametrize("strategy,n", [("random:5", 5), ("random:25%", 5), ("random:50", 20)])
def test_mixture_random_is_deterministic_by_seed(tmp_path, strategy, n):
    path = write_mixture(tmp_path, ["end:1", strategy])
    a, b, c = ids(path, seed=0), ids(path, seed=0), ids(path, seed=1)
    assert a == b and len(a) == 1 + n and a[0] == "a19"
    picked = a[1:]
    assert set(picked) <= {f"b{i}" for i in range(20)} and len(set(picked)) == n
    assert picked == sorted(picked, key=lambda s: int(s[1:]))  # file order kept
    if n < 20:
        assert c != a  # another seed, another pick
    assert count_records(path, seed=1) == 1 + n
    # positions are the mixture's; skipping some keeps the others' positions and records
    kept = [(p, r["id"]) for p, r in iter_records(path, seed=0, skip=lambda p: p % 2 == 0)]
    assert kept == [(p, x) for p, x in enumerate(a) if p % 2]
    assert [f.name for f in input_files(path)] == ["mix.yaml", "a.json", "b.jsonl"]


def test_mixture_expands_like_its_records_and_follows_the_seed(tmp_path):
    path = write_mixture(tmp_path, ["first:2", "random:3"])
    run_cli("expand", path, "--out", tmp_path / "o0", *FAST, "--workers", "0")
    run_cli("expand", path, "--out", tmp_path / "o7", *FAST, "--workers", "0", "--seed", "7")
    assert [r["id"] for r in outputs(tmp_path / "o0")] == ids(path, seed=0)
    assert [r["id"] for r in outputs(tmp_path / "o7")] == ids(path, seed=7)
    dry = run_cli("expand", path, "--out", tmp_path / "d", *FAST, "--dry-run", "--seed", "7").output
    assert "records: 5" in dry


@pytest.mark.parametrize("text,needle", [
    ("datasets: []\n", "expected `datasets:`"),
    ("datasets:\n  - json_path: nope.json\n", "does not exist"),
    ("datasets:\n  - json_path: ../data/a.json\n    sampling_strategy: middle:3\n", "sampling_strategy 'middle:3'"),
    ("datasets: [oops\n", "not a readable YAML"),
])
def test_bad_mixture_is_one_line_error(tmp_path, text, needle):
    write_mixture(tmp_path, ["all", "all"])
    bad = tmp_path / "cfg" / "bad.yaml"
    bad.write_text(text)
    result = run_cli("expand", bad, "--out", tmp_path / "o", *FAST, expect=2)
    assert needle in result.output and result.output.count("\n") <= 2


def test_role_content_and_messages_records_are_converted_and_counted(tmp_path):
    records = [
        {"id": "rc", "image": "images/coins.png",
         "conversations": [{"role": "user", "content": "<image>\nCoins?"}, {"role": "assistant", "content": "Yes."}]},
        {"id": "msg", "images": ["images/coins.png"],
         "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Coins?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]},
        {"id": "text", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"id": "sys", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello"}]},
        {"id": "llava", "image": "images/coins.png",
         "conversations": [{"from": "human", "value": "<image>\nCoins?"}, {"from": "gpt", "value": "Yes."}]},
    ]
    src = json_input(tmp_path, records)
    out = tmp_path / "out"
    result = run_cli("expand", src, "--out", out, *FAST, "--workers", "0")
    assert "converted from chat format: messages (3), role_content (1)" in result.output
    got = {r["id"]: r for r in outputs(out)}
    assert got["rc"]["conversations"][:2] == [{"from": "human", "value": "<image>\nCoins?"}, {"from": "gpt", "value": "Yes."}]
    assert got["msg"]["conversations"][:2] == [{"from": "human", "value": "<image>\nCoins?"}, {"from": "gpt", "value": "Yes."}]
    assert got["msg"]["image"] == "images/coins.png" and "messages" not in got["msg"] and "images" not in got["msg"]
    assert got["text"] == {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    assert all(len(got[k]["conversations"]) == 6 for k in ("rc", "msg", "llava"))
    report = json.loads((out / "report.json").read_text())
    assert report["converted"] == {"messages": 3, "role_content": 1}
    # issue 14 item 15: a leading system turn moves to `system`; the record is not rejected
    assert got["sys"] == {"id": "sys", "system": "Be brief.",
                          "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    assert report["reject_reasons"] == {} and report["expanded"] == 3 and report["passed"] == 2


def test_image_parts_that_name_their_file_give_the_record_its_image(tmp_path):
    """TRL / HF chat parts `{"type": "image", "image": "a.png"}`: the image is not dropped (the record used
    to pass as text-only with an `<image>` token and no image)."""
    parts = lambda src: [{"type": "image", **src}, {"type": "text", "text": "Coins?"}]  # noqa: E731
    answer = {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}
    records = [{"id": "inline", "messages": [{"role": "user", "content": parts({"image": "images/coins.png"})}, answer]},
               {"id": "path", "messages": [{"role": "user", "content": parts({"path": "images/coins.png"})}, answer]},
               {"id": "bytes", "messages": [{"role": "user", "content": parts({"image": {"bytes": "xx"}})}, answer]}]
    src = json_input(tmp_path, records)
    out = tmp_path / "out"
    run_cli("expand", src, "--out", out, *FAST, "--workers", "0")
    got = {r["id"]: r for r in outputs(out)}
    for key in ("inline", "path"):
        assert got[key]["image"] == "images/coins.png" and len(got[key]["conversations"]) == 6
    report = json.loads((out / "report.json").read_text())
    assert report["expanded"] == 2 and report["rejected"] == 1 and "bytes" not in got


def test_parquet_with_an_images_list_of_structs_and_messages(tmp_path):
    """TRL / HF chat layout on the Hub: `messages` + `images` as a list of Image structs (and `image` as a
    list of them). It used to stop the whole run with `bytes is not JSON serializable`."""
    coins = (IMAGES / "coins.png").read_bytes()
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Coins?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]
    llava = [{"from": "human", "value": "<image>\nCoins?"}, {"from": "gpt", "value": "Yes."}]
    pq.write_table(pa.Table.from_pylist([{"id": "m", "images": [{"bytes": coins, "path": "c.png"}], "messages": user}]),
                   tmp_path / "messages.parquet")
    pq.write_table(pa.Table.from_pylist([{"id": "l", "image": [{"bytes": coins, "path": None}], "conversations": llava}]),
                   tmp_path / "list.parquet")
    for name, key, image in (("messages", "m", "c.png"), ("list", "l", ["embedded-0-0"])):
        out = tmp_path / f"out-{name}"
        run_cli("expand", tmp_path / f"{name}.parquet", "--out", out, *FAST, "--workers", "0")
        (record,) = outputs(out)
        assert record["id"] == key and record["image"] == image and len(record["conversations"]) == 6


def test_a_binary_column_rejects_its_record_not_the_run(tmp_path):
    """A column JSON cannot hold (bytes other than images) stopped the whole run with a traceback."""
    llava = [{"from": "human", "value": "<image>\nCoins?"}, {"from": "gpt", "value": "Yes."}]
    shutil.copytree(IMAGES, tmp_path / "images")
    rows = [{"id": "bin", "image": "images/coins.png", "thumb": b"\0\1", "conversations": llava},
            {"id": "ok", "image": "images/coins.png", "thumb": None, "conversations": llava}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    out = tmp_path / "out"
    run_cli("expand", tmp_path / "x.parquet", "--out", out, *FAST, "--workers", "1")
    (reject,) = map(json.loads, (out / "rejects.jsonl").read_text().splitlines())
    assert reject["index"] == 0 and reject["reason"] == "invalid_json" and "column `thumb`" in reject["detail"]
    assert [r["id"] for r in outputs(out)] == ["ok"]


def test_an_unknown_chat_role_is_named_in_the_reject():
    from cogalign.errors import RecordError
    from cogalign.inputs.turns import to_llava
    from cogalign.inputs.records import check_record

    record, _ = to_llava({"id": "r", "conversations": [{"role": "user", "content": "Hi"},
                                                       {"role": "bot", "content": "Hello"}]})
    with pytest.raises(RecordError, match="turn 1 is a {role, content} turn with role 'bot'; cogalign converts only the roles user, assistant"):
        check_record(record)


@pytest.mark.parametrize("strategy,expect", [
    ("end:0", [f"a{i}" for i in range(20)]),  # LLaVA-NeXT's [-0:]: the whole file
    ("first:0", []),
    ('"first: 3"', ["a0", "a1", "a2"]),  # LLaVA-NeXT's int(" 3") is 3
])
def test_mixture_edges_follow_llava_next(tmp_path, strategy, expect):
    path = write_mixture(tmp_path, [strategy, "first:1"])
    assert ids(path) == expect + ["b0"] and count_records(path) == len(expect) + 1


@pytest.mark.parametrize("strategy,needle", [
    ("random:2.5%", "stops on a fraction"),  # LLaVA-NeXT: int("2.5") raises
    ("Random:5", "matches 'random' exactly"),  # LLaVA-NeXT: no branch matches, the whole file is taken
    ('"first :3"', "matches 'first' exactly"),
    ("all:5", "sampling_strategy 'all:5'"),
])
def test_mixture_strategies_llava_next_would_not_apply_are_refused(tmp_path, strategy, needle):
    path = write_mixture(tmp_path, [strategy, "all"])
    result = run_cli("expand", path, "--out", tmp_path / "o", *FAST, expect=2)
    assert needle in result.output and result.output.count("\n") <= 2


def test_image_tokens_are_counted_against_the_images(tmp_path):
    """Issue 14 item 9: `<image>` with no usable image passed as text_only; a correct 2-image record
    was warned `image_token_repeated`."""
    coins = (IMAGES / "coins.png").read_bytes()
    one = [{"from": "human", "value": "<image>\nCoins?"}, {"from": "gpt", "value": "Yes."}]
    two = [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "Yes."}]
    img = {"bytes": coins, "path": "c.png"}
    rows = [{"id": "null", "image": None, "conversations": one},
            {"id": "empty", "image": [{"bytes": None, "path": None}], "conversations": one},
            {"id": "two", "image": [img, img], "conversations": two},
            {"id": "two-one-empty", "image": [img, {"bytes": None, "path": None}], "conversations": two},
            {"id": "one", "image": [img], "conversations": one}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    # TRL layout: an image part, and `images` holding only an empty struct
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Coins?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]
    pq.write_table(pa.Table.from_pylist([{"id": "m", "images": [{"bytes": None, "path": None}], "messages": chat}]),
                   tmp_path / "y.parquet")
    out = tmp_path / "out"
    run_cli("expand", tmp_path / "x.parquet", "--out", out, *FAST, "--workers", "0")
    report = json.loads((out / "report.json").read_text())
    assert report["reject_reasons"] == {"image_token_without_image": 2, "image_count_mismatch": 1}
    assert report["expanded"] == 2 and report["passed"] == 0 and report["warnings"] == {}
    rejects = {json.loads(line)["index"]: json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()}
    assert sorted(rejects) == [0, 1, 3] and "no usable image" in rejects[0]["detail"]
    run_cli("expand", tmp_path / "y.parquet", "--out", tmp_path / "out-m", *FAST, "--workers", "0")
    report = json.loads((tmp_path / "out-m" / "report.json").read_text())
    assert report["reject_reasons"] == {"image_token_without_image": 1} and report["passed"] == 0


def test_system_turns_and_openai_image_url_parts(tmp_path):
    """Issue 14 items 15 and 16: leading system turns (several, with typed parts) are kept in `system`;
    OpenAI `image_url` parts give their local file (plain or file://), a remote URL is refused by name."""
    from cogalign.inputs.turns import to_llava

    src = json_input(tmp_path, [])
    coins = src.parent / "images" / "coins.png"
    answer = {"role": "assistant", "content": "Yes."}
    ask = lambda url: [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Coins?"}]  # noqa: E731
    records = [
        {"id": "sys", "system": "Old.", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
            {"role": "user", "content": ask("images/coins.png")}, answer]},
        {"id": "file", "messages": [{"role": "user", "content": ask(coins.as_uri())}, answer]},
        {"id": "plain", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "images/coins.png"},
                                                                 {"type": "text", "text": "Coins?"}]}, answer]},
        {"id": "remote", "messages": [{"role": "user", "content": ask("https://example.com/coins.png")}, answer]},
        {"id": "data", "messages": [{"role": "user", "content": ask("data:image/png;base64,iVBORw0KGgo=")}, answer]},
        # named twice: `images` and the part agree -> kept; they differ -> which one is meant?
        {"id": "same", "images": ["images/coins.png"], "messages": [{"role": "user", "content": ask("images/coins.png")}, answer]},
        {"id": "twice", "images": ["images/other.png"], "messages": [{"role": "user", "content": ask("images/coins.png")}, answer]},
    ]
    assert to_llava(records[0])[0]["system"] == "Old.\nBe brief.\nBe kind."
    src.write_text(json.dumps(records))
    out = tmp_path / "out"
    run_cli("expand", src, "--out", out, *FAST, "--workers", "0", "--allow-absolute-paths")
    got = {r["id"]: r for r in outputs(out)}
    assert got["sys"]["image"] == "images/coins.png" and got["sys"]["conversations"][0]["value"] == "<image>\nCoins?"
    assert got["file"]["image"] == str(coins) and got["plain"]["image"] == "images/coins.png"
    assert all(len(got[k]["conversations"]) == 6 for k in ("sys", "file", "plain", "same"))
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["index"], r["reason"]) for r in rejects] == [(3, "image_remote_url"), (4, "image_remote_url"),
                                                            (6, "image_conflict")]
    assert "images/other.png" in rejects[2]["detail"] and "keep one" in rejects[2]["detail"]
    assert "does not fetch" in rejects[0]["detail"]
