"""The training data path: masking, truncation, missing images, special VQ tokens,
stage plans and eval scores. Needs transformers (the `train` extra)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from cogalign.train.collate import IGNORE, Collator, Encoder, from_special_vq, to_special_vq  # noqa: E402
from cogalign.train.data import ShardDataset  # noqa: E402
from tests.helpers import FAST, EXAMPLES, run_cli  # noqa: E402


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "out"
    run_cli("expand", EXAMPLES, "--out", out, "--shard-size", "4", "--workers", "0", *FAST)
    return out


@pytest.fixture(scope="module")
def processor(out):
    from cogalign.train.model import shard_texts, tiny_processor, train_tokenizer

    return tiny_processor(train_tokenizer(shard_texts(out), vocab_size=400))


def test_missing_images_are_counted_not_substituted(out, tmp_path, processor):
    ds = ShardDataset(out, image_root=tmp_path)  # an empty folder: every image is missing
    batch = Collator(Encoder(processor, 512))([ds[i] for i in range(len(ds))])
    assert batch["stats"]["skipped"]["image_missing"] == 13 and batch["stats"]["seen"] == 1  # 1 text-only record


def _turns():
    return [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "VQ please"}, {"from": "gpt", "value": "<vq start>5, 17, 5<vq end>"},
            {"from": "human", "value": "RGB please"}, {"from": "gpt", "value": "<rgb start>[[1, 2, 3]]<rgb end>"}]


def _image():
    from PIL import Image

    return Image.new("RGB", (32, 32))


def test_labels_only_on_gpt_answers_token_by_token(processor):
    from cogalign.train.sample import runs

    enc = Encoder(processor, 4096)
    tok = processor.tokenizer
    row = enc.encode_record(_turns(), [_image()])
    ids, labels = row["input_ids"], row["labels"]
    assert ids.count(enc.image_id) == enc.num_image_tokens == 16
    assert all(l in (IGNORE, i) for i, l in zip(ids, labels))
    # the supervised tokens are exactly: each answer (after `ASSISTANT:`) followed by </s>, in order
    answers = [t["value"] for t in _turns() if t["from"] == "gpt"]
    assert [tok.decode(r).lstrip() for r in runs(ids, labels)] == [a + "</s>" for a in answers]
    masked = tok.decode([i for i, l in zip(ids, labels) if l == IGNORE and i != enc.image_id])
    assert masked.replace("ASSISTANT: ", "ASSISTANT:").endswith(
        "questions. USER: \nWhat is it? ASSISTANT:USER: VQ please ASSISTANT:USER: RGB please ASSISTANT:")
    first = ids.index(enc.image_id)
    assert tok.decode(ids[:first]).endswith("questions. USER: ") and tok.decode(ids[first + 16:]).startswith("\nWhat")
    assert row["kinds"].count(2) == len(runs(ids, labels)[1]) and row["kinds"].count(3) == len(runs(ids, labels)[2])
    # the generation prompt of each answer is the training prefix, token for token (generate's too)
    starts = [i for i, l in enumerate(labels) if l != IGNORE and labels[i - 1] == IGNORE]
    for k, start in zip((1, 3, 5), starts):
        assert enc.prompt_ids(_turns(), k, [_image()]) == ids[:start]
        assert enc.encode(enc.segments(_turns(), True, upto=k))["input_ids"] == ids[:start]
    # the image expansion matches LlavaProcessor's own
    got = processor(text="x <image> y", images=_image())["input_ids"][0]
    assert list(got).count(enc.image_id) == enc.num_image_tokens


def test_truncation_is_counted_per_kind(processor):
    enc = Encoder(processor, 4096)
    full = len(enc.encode_record(_turns(), [_image()])["input_ids"])
    short = Encoder(processor, full - 3).encode_record(_turns(), [_image()])
    assert len(short["input_ids"]) == full - 3
    assert dict(short["truncated"]) == {"px": 1}
    ids = enc.encode_record(_turns(), [_image()])["input_ids"]
    tiny = Encoder(processor, ids.index(enc.image_id) + 16 + 3).encode_record(_turns(), [_image()])
    assert dict(tiny["truncated"]) == {"original": 1, "vq": 1, "px": 1}
    with pytest.raises(ValueError, match="max_length_below_image"):
        Encoder(processor, ids.index(enc.image_id) + 8).encode_record(_turns(), [_image()])


def test_special_vq_tokens_round_trip(processor):
    from cogalign.train.model import tiny_model, add_vq_tokens

    text = "<vq start>0, 4095, 17, 17<vq end>"
    assert to_special_vq(text) == "<vq start><vq_0><vq_4095><vq_17><vq_17><vq end>"
    assert from_special_vq(to_special_vq(text)) == text
    model = tiny_model(processor.tokenizer, layers=1, hidden=32)
    before = model.get_input_embeddings().weight.shape[0]
    assert add_vq_tokens(model, processor, 4096) == 4096
    assert model.get_input_embeddings().weight.shape[0] == before + 4096
    enc = Encoder(processor, 4096, vq_tokens="special")
    row = enc.encode_record([{"from": "human", "value": "VQ?"}, {"from": "gpt", "value": text}], [])
    body = [i for i in row["input_ids"] if processor.tokenizer.convert_ids_to_tokens(i).startswith("<vq_")]
    assert len(body) == 4  # one token per index
    answer = [i for i, l in zip(row["input_ids"], row["labels"]) if l != IGNORE]
    assert enc.decode_answer(answer) == text


def test_stage_plans_match_table_7(out):
    from cogalign.train.model import shard_texts, tiny_model, train_tokenizer
    from cogalign.train.stages import make_plan, plan_json

    model = tiny_model(train_tokenizer(shard_texts(out), 300), layers=1, hidden=32)
    want = {1: (256, {"projector": 1e-3, "vision_tower": None, "language_model": None}),
            2: (64, {"projector": 1e-3, "vision_tower": 2e-6, "language_model": None}),
            3: (32, {"projector": 1e-5, "vision_tower": 2e-6, "language_model": 1e-5})}
    for stage, (batch, lrs) in want.items():
        plan = plan_json(make_plan(stage), model)
        assert plan["stage"] == stage and plan["global_batch_size"] == batch
        assert plan["warmup_ratio"] == 0.03 and plan["weight_decay"] == 0.0
        assert plan["gradient_accumulation_steps"] == batch // 8
        for g in plan["groups"]:
            assert g["lr"] == lrs[g["name"]]
            assert (g["trainable_params"] > 0) == (lrs[g["name"]] is not None)
    over = plan_json(make_plan(1, lr=["language_model=1e-4"], global_batch_size=16, per_device_batch_size=4), model)
    assert over["gradient_accumulation_steps"] == 4 and over["groups"][2]["trainable_params"] > 0


def test_print_plan_cli(out):
    res = run_cli("train", "--model", "tiny", "--data", out, "--stage", "2", "--print-plan")
    plan = json.loads(res.stdout)
    assert list(plan) == ["stage", "global_batch_size", "gradient_accumulation_steps", "warmup_ratio",
                          "weight_decay", "groups"]
    assert [g["lr"] for g in plan["groups"]] == [1e-3, 2e-6, None]


def test_eval_scores_truth_perfect_and_corruption_lower(out, tmp_path):
    from cogalign.train.data import shard_files
    from cogalign.train.generate import inserted_turns
    from cogalign.expand.writer import read_shard

    truth, bad = tmp_path / "truth.jsonl", tmp_path / "bad.jsonl"
    with open(truth, "w") as t, open(bad, "w") as b:
        for f in shard_files(out):
            for rec in read_shard(f):
                for i, kind in inserted_turns(rec):
                    text = rec["conversations"][i]["value"]
                    t.write(json.dumps({"id": rec["id"], "kind": kind, "text": text}) + "\n")
                    wrong = text.replace("1", "2").replace("[", "[9") if kind == "px" else text.replace("1", "2")
                    b.write(json.dumps({"id": rec["id"], "kind": kind, "text": wrong}) + "\n")
        b.write(json.dumps({"id": "nobody", "kind": "vq", "text": "x"}) + "\n")
    good = json.loads(run_cli("eval", "--data", out, "--predictions", truth, "--json").stdout)
    assert good["vq"]["n"] == good["px"]["n"] == 13
    assert good["vq"]["format_ok"] == good["vq"]["index_accuracy"] == 1.0 and good["vq"]["length_error"] == 0.0
    assert good["px"]["exact_match"] == 1.0 and good["px"]["mae"] == 0.0 and good["px"]["psnr"] == "inf"
    worse = json.loads(run_cli("eval", "--data", out, "--predictions", bad, "--json").stdout)
    assert worse["unknown_predictions"] == 1
    assert worse["vq"]["index_accuracy"] < 1.0 and worse["px"]["exact_match"] < 1.0
    assert worse["px"]["mae"] > 0 and worse["px"]["psnr"] < 99
    table = run_cli("eval", "--data", out, "--predictions", truth).stdout
    assert "exact match 100.0%" in table
