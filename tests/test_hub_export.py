"""`cogalign export`: each format loads with `datasets` and reads as its trainer reads it; each rule rejects."""
from __future__ import annotations

import json
import os

import orjson
import pytest

from cogalign.hub.export import FORMATS, RULES
from cogalign.expand.writer import read_shard
from helpers import EXAMPLES, run_cli
from hub_fixtures import append_records, copy_output, expand_examples


@pytest.fixture(scope="module")
def parquet_out(tmp_path_factory):
    return expand_examples(tmp_path_factory.mktemp("exp") / "out")


@pytest.fixture(scope="module")
def jsonl_out(tmp_path_factory):
    return expand_examples(tmp_path_factory.mktemp("expj") / "out", "--format", "jsonl")


def source_records(out):
    return [r for f in sorted((out / "data").iterdir()) for r in read_shard(f)]


@pytest.mark.parametrize("fmt, name", [("llava-json", "x.json"), ("llava-jsonl", "x.jsonl"),
                                       ("sharegpt", "x.json"), ("messages", "x.jsonl")])
def test_each_format_loads_with_datasets(parquet_out, tmp_path, fmt, name):
    import datasets

    dest = tmp_path / name
    result = run_cli("export", parquet_out, "--to", fmt, "--out", dest, "--no-progress")
    assert "written: 14  rejected: 0" in result.output
    ds = datasets.load_dataset("json", data_files=str(dest), split="train")
    assert ds.num_rows == 14
    source = source_records(parquet_out)
    assert ds["id"] == [r["id"] for r in source]
    column = {"llava-json": "conversations", "llava-jsonl": "conversations", "sharegpt": "conversations",
              "messages": "messages"}[fmt]
    assert [len(c) for c in ds[column]] == [len(r["conversations"]) for r in source]
    if fmt == "messages":  # typed parts; an image part where each <image> stood
        first = ds[0]["messages"][0]
        assert first["role"] == "user" and first["content"][0]["type"] == "image"
        assert first["content"][1] == {"type": "text", "text": "Who or what is shown in this photo?"}
        assert ds[0]["messages"][1]["role"] == "assistant"


def test_llava_json_reads_like_lazy_supervised_dataset(parquet_out, tmp_path):
    """LLaVA: json.load of one array; os.path.join(image_folder, image) opens; strict alternation."""
    from PIL import Image

    folder = EXAMPLES.parent / "images"
    dest = tmp_path / "llava.json"
    run_cli("export", parquet_out, "--to", "llava-json", "--out", dest, "--image-folder", folder, "--no-progress")
    data = json.load(open(dest))
    assert isinstance(data, list) and len(data) == 14
    with_image = [r for r in data if "image" in r]
    assert len(with_image) == 13
    for r in with_image:
        assert not os.path.isabs(r["image"]) and "/" not in r["image"]  # relative to the folder given
        Image.open(os.path.join(folder, r["image"])).verify()
        roles = [t["from"] for t in r["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2)
        assert sum(t["value"].count("<image>") for t in r["conversations"]) == 1
    assert set(data[0]) == {"id", "image", "conversations", "cogalign"}  # other keys are kept (LLaVA ignores them)
    assert data[0]["cogalign"] == source_records(parquet_out)[0]["cogalign"]


def test_sharegpt_registers_dataset_info_and_resolves_from_media_dir(parquet_out, tmp_path):
    import datasets

    (tmp_path / "dataset_info.json").write_text(json.dumps({"other": {"file_name": "o.json"}}))
    dest = tmp_path / "cog.json"
    result = run_cli("export", parquet_out, "--to", "sharegpt", "--out", dest, "--image-folder", EXAMPLES.parent,
                     "--no-progress")
    assert "registered as 'cog'" in result.output
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info["other"] == {"file_name": "o.json"}  # the user's entries are kept
    assert info["cog"] == {"file_name": "cog.json", "formatting": "sharegpt",
                           "columns": {"messages": "conversations", "images": "images"},
                           "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                                    "assistant_tag": "gpt"}, "cogalign_export": True}
    ds = datasets.load_dataset("json", data_files=str(dest), split="train")
    for row in ds:  # LLaMA-Factory: count of <image> == len(images); media_dir + path is a file
        assert sum(t["value"].count("<image>") for t in row["conversations"]) == len(row["images"])
        assert all((EXAMPLES.parent / p).is_file() for p in row["images"])


def test_a_broken_dataset_info_is_refused_before_anything_is_written(parquet_out, tmp_path):
    """It was an orjson traceback, after the export file was already written."""
    (tmp_path / "dataset_info.json").write_text("{bad")
    result = run_cli("export", parquet_out, "--to", "sharegpt", "--out", tmp_path / "cog.json", "--no-progress",
                     expect=2)
    assert "dataset_info.json: not valid JSON" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "cog.json").exists() and (tmp_path / "dataset_info.json").read_text() == "{bad"


def _tiny_processor(tmp_path):
    """A LLaVA processor built offline: a WordLevel tokenizer trained here, CLIP preprocessing, a jinja
    chat template that renders typed parts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    corpus = [EXAMPLES.read_text(), "USER ASSISTANT"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<image>", "</s>"]))
    template = ("{% for m in messages %}{{ m['role'].upper() }}: {% for p in m['content'] %}"
                "{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %}</s>"
                "{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>",
                                   extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=14, num_additional_image_tokens=0,
                          vision_feature_select_strategy="default", chat_template=template)


def test_messages_render_through_a_chat_template_with_image_parts(parquet_out, tmp_path):
    """What TRL's vision collator does: apply_chat_template on the messages, then the processor on text + images."""
    import datasets
    from PIL import Image

    dest = tmp_path / "m.jsonl"
    run_cli("export", parquet_out, "--to", "messages", "--out", dest, "--image-folder", EXAMPLES.parent,
            "--no-progress")
    processor = _tiny_processor(tmp_path)
    ds = datasets.load_dataset("json", data_files=str(dest), split="train")
    per_image = (28 // 14) ** 2 - 1  # strategy "default" drops the CLS feature
    rendered = 0
    for row in ds:
        if not row["images"]:
            continue
        messages = [{"role": m["role"], "content": [{k: v for k, v in p.items() if v is not None}
                                                    for p in m["content"]]} for m in row["messages"]]
        text = processor.apply_chat_template(messages, tokenize=False)
        assert text.count("<image>") == len(row["images"]) == 1
        assert messages[-1]["content"][0]["text"] in text  # the last answer is there, whole
        pil = [Image.open(EXAMPLES.parent / p).convert("RGB") for p in row["images"]]
        batch = processor(text=text, images=pil, return_tensors="pt")
        assert int((batch["input_ids"] == processor.image_token_id).sum()) == per_image * len(pil)
        assert tuple(batch["pixel_values"].shape) == (1, 3, 28, 28)
        rendered += 1
    assert rendered == 13


# One hand-made record per rule (a user's edit, another tool's output): each is reported, none is written.
GOOD = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
INSERTED = {"turns": [{"kind": "vq", "position": 1}]}
CAT = "images/chelsea.png"  # a file: export writes no paths that point nowhere
BREAKING = [  # (the one reason expected, the record)
    ("not_an_object", ["a list, not a record"]),
    ("conversations_missing", {"id": "b0", "image": CAT, "conversations": []}),
    ("roles_not_alternating", {"id": "b1", "image": CAT,
                               "conversations": [GOOD[0], {"from": "human", "value": "More?"}]}),
    ("empty_value", {"id": "b2", "image": CAT, "conversations": [GOOD[0], {"from": "gpt", "value": " "}]}),
    ("image_count_mismatch", {"id": "b3", "image": CAT,
                              "conversations": [{"from": "human", "value": "no token"}, GOOD[1]]}),
    # one <image> for one image, but in the inserted turn: only this rule catches it
    ("image_in_inserted_turn", {"id": "b4", "image": CAT, "cogalign": INSERTED, "conversations": [
        {"from": "human", "value": "What is it?"}, GOOD[1], {"from": "human", "value": "VQ of <image>?"},
        {"from": "gpt", "value": "<vq start>1<vq end>"}]}),
    ("provenance_mismatch", {"id": "b5", "image": CAT, "conversations": GOOD,
                             "cogalign": {"turns": [{"kind": "vq", "position": 4}]}}),
    ("provenance_mismatch", {"id": "b5b", "image": CAT, "conversations": GOOD,
                             "cogalign": {"turns": [{"kind": "vq", "position": 0.5}]}}),
    ("image_without_path", {"id": "b6", "image": {"bytes": None, "path": None}, "conversations": GOOD}),
]


def test_rules_table_is_covered():
    assert {reason for reason, _ in BREAKING} | {"image_file_missing", "image_embedded_only"} == set(RULES)


@pytest.mark.parametrize("fmt", FORMATS)
def test_image_that_is_no_file_is_reported_with_image_folder(jsonl_out, tmp_path, fmt):
    """An input with embedded images (Hub parquet) leaves paths that were never files: with --image-folder
    they were written anyway, and the trainer failed on them mid-run."""
    out = copy_output(jsonl_out, tmp_path / "o")
    append_records(out, [{"id": "ghost", "image": "images/never-a-file.png", "conversations": GOOD}])
    dest = tmp_path / ("x.json" if fmt == "llava-json" else "x.jsonl")
    result = run_cli("export", out, "--to", fmt, "--out", dest, "--image-folder", EXAMPLES.parent, "--no-progress")
    assert "written: 14  rejected: 1" in result.output
    (reject,) = [orjson.loads(line) for line in open(dest.with_name(dest.name + ".rejects.jsonl"))]
    assert reject["id"] == "ghost" and reject["reasons"] == ["image_file_missing"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_rule_has_a_breaking_record_that_is_reported(jsonl_out, tmp_path, fmt):
    out = copy_output(jsonl_out, tmp_path / "o")
    fine = {"id": "ok-struct", "image": {"bytes": None, "path": CAT}, "conversations": GOOD}
    append_records(out, [*(rec for _, rec in BREAKING), fine])
    dest = tmp_path / ("x.json" if fmt == "llava-json" else "x.jsonl")
    result = run_cli("export", out, "--to", fmt, "--out", dest, "--no-progress")
    assert f"written: 15  rejected: {len(BREAKING)}" in result.output
    rejects = [orjson.loads(line) for line in open(dest.with_name(dest.name + ".rejects.jsonl"))]
    assert [r["reasons"] for r in rejects] == [[reason] for reason, _ in BREAKING]  # in order, one reason each
    assert [r["id"] for r in rejects] == [rec.get("id") if isinstance(rec, dict) else None for _, rec in BREAKING]
    assert all(r["detail"] for r in rejects)
    text = dest.read_text()
    written = [r["id"] for r in (json.loads(text) if fmt == "llava-json" else map(json.loads, text.splitlines()))]
    assert len(written) == 15 and written[-1] == "ok-struct"  # a {bytes, path} struct is read for its path
    assert not set(written) & {rec["id"] for _, rec in BREAKING if isinstance(rec, dict)}


def test_big_integers_stay_exact(jsonl_out, tmp_path):
    out = copy_output(jsonl_out, tmp_path / "o")
    big = 2**70 + 1
    shard = sorted((out / "data").glob("*.jsonl"))[-1]
    with open(shard, "a") as f:
        f.write(json.dumps({"id": big, "image": CAT, "conversations": GOOD}) + "\n")
    dest = tmp_path / "x.json"
    run_cli("export", out, "--to", "llava-json", "--out", dest, "--no-progress")
    assert json.load(open(dest))[-1]["id"] == big


def test_refusals(parquet_out, tmp_path):
    result = run_cli("export", parquet_out, "--to", "alpaca", "--out", tmp_path / "x.json", expect=2)
    assert "unknown format" in result.output and "llava-json" in result.output
    result = run_cli("export", parquet_out, "--to", "sharegpt", "--out", parquet_out / "x.json", expect=2)
    assert "outside the output folder" in result.output
    broken = copy_output(parquet_out, tmp_path / "b")
    (broken / "report.json").unlink()
    result = run_cli("export", broken, "--to", "sharegpt", "--out", tmp_path / "x.json", expect=2)
    assert "merge-report" in result.output and "Traceback" not in result.output


def test_inserted_turns_found_from_provenance(parquet_out):
    """The provenance locates every inserted pair (markers of the answers as the independent check)."""
    from cogalign.hub.output import inserted_turns

    for record in source_records(parquet_out):
        found = inserted_turns(record)
        marked = {i: ("vq" if t["value"].startswith("<vq start>") else "px")
                  for i, t in enumerate(record["conversations"])
                  if i % 2 and t["value"].startswith(("<vq start>", "<rgb start>"))}
        assert {i: k for i, k in found.items() if i % 2} == marked
    # positions out of order, and two pairs after the same original pair
    conv = [{"from": r, "value": v} for v, r in zip("abcdefghijkl", ["human", "gpt"] * 6)]
    meta = {"turns": [{"kind": "vq", "position": 2}, {"kind": "px", "position": 1}, {"kind": "vq", "position": 1}]}
    assert inserted_turns({"conversations": conv, "cogalign": meta}) == {
        2: "px", 3: "px", 4: "vq", 5: "vq", 8: "vq", 9: "vq"}
