"""`cogalign generate`: batched answers equal one-at-a-time answers, --max-length drops whole earlier
turns (keeping the image and the question) and counts each cut, and the CLI's options and --out."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tests.helpers import run_cli  # noqa: E402
from tests.train_fixtures import expand_px, quadrant_set  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """8 records of two original turn pairs (earlier answers of 0 to 280 words) with one RGB pair
    spliced in, and a random `tiny` saved as a run folder."""
    import torch

    from cogalign.train.model import load

    root = tmp_path_factory.mktemp("gen")
    src = quadrant_set(root / "src", 8, 0)
    recs = json.loads(src.read_text())
    for k, r in enumerate(recs):
        r["conversations"] = [{"from": "human", "value": "<image>\nWhat is this?"},
                              {"from": "gpt", "value": "Four squares. " * (40 * k)},
                              {"from": "human", "value": "And the colours?"},
                              {"from": "gpt", "value": "Red and green."}]
    src.write_text(json.dumps(recs))
    expand_px(src, root / "out")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    net, processor = load("tiny", root / "out", seed=0)
    net.save_pretrained(root / "run")
    processor.save_pretrained(root / "run")
    yield root
    torch.set_num_threads(before)


def _items(out: Path):
    from cogalign.train.data import ShardDataset

    return ShardDataset(out, shuffle=False)


def _model(run: Path):
    from cogalign.train.generate import load_run

    model, processor, _ = load_run(run)
    return model, processor


def test_batched_answers_equal_one_at_a_time(tiny_run):
    from cogalign.train.generate import generate

    model, processor = _model(tiny_run / "run")
    calls = []
    real = model.generate
    model.generate = lambda **kw: calls.append(kw["input_ids"].shape) or real(**kw)
    one = list(generate(model, processor, _items(tiny_run / "out"), max_new_tokens=6, max_length=4096, batch_size=1))
    one_calls, calls[:] = list(calls), []
    many = list(generate(model, processor, _items(tiny_run / "out"), max_new_tokens=6, max_length=4096, batch_size=3))
    assert len(one) == 8 and len(one_calls) == 8
    assert [shape[0] for shape in calls] == [3, 3, 2]  # three batches of left-padded prompts
    assert len({shape[1] for shape in one_calls}) > 4  # prompts of different lengths share a batch
    assert many == one
    assert all(p["kind"] == "px" and p["turns_dropped"] == 0 for p in one)


def test_llava_next_batches_with_image_sizes(tiny_run):
    """LLaVA-NeXT (anyres): every image input of the processor reaches generate(), batched answers
    equal one-at-a-time ones. Needs the `tiny-next` builder (the LLaVA-NeXT part of issue 13)."""
    from cogalign.train import model as builders
    from cogalign.train.generate import generate

    if "tiny-next" not in getattr(builders, "TINY_MODELS", ()):
        pytest.skip("no tiny-next builder in this tree")
    model, processor = builders.load("tiny-next", tiny_run / "out", seed=0)
    model.eval()
    calls, real = [], model.generate
    model.generate = lambda **kw: calls.append(sorted(kw)) or real(**kw)
    one = list(generate(model, processor, _items(tiny_run / "out"), max_new_tokens=4, max_length=4096, batch_size=1))
    many = list(generate(model, processor, _items(tiny_run / "out"), max_new_tokens=4, max_length=4096, batch_size=4))
    assert len(one) == 8 and many == one
    assert all("image_sizes" in kw and "pixel_values" in kw for kw in calls)


def test_max_length_drops_earlier_turns_and_keeps_image_and_question(tiny_run):
    from cogalign.train.collate import Encoder
    from cogalign.train.data import ShardDataset
    from cogalign.train.generate import fit_prompt, generate, inserted_turns, item_images

    _, processor = _model(tiny_run / "run")
    max_length = 160
    enc, whole = Encoder(processor, max_length + 1), Encoder(processor, 100_000)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    seen = {0: 0, 2: 0}
    for item in ShardDataset(tiny_run / "out", shuffle=False):
        conv, images = item["record"]["conversations"], item_images(item)
        (turn, _), = inserted_turns(item["record"])
        full = whole.prompt_ids(conv, turn, images)
        ids, dropped, problem = fit_prompt(enc, conv, turn, images, max_length)
        assert problem is None and len(images) == 1 and len(ids) <= max_length
        assert dropped % 2 == 0 and (dropped == 0) == (len(full) <= max_length)
        if dropped:  # the prompt of the conversation from the first question kept, with the image moved there
            kept = [{**conv[dropped], "value": "<image>\n" + conv[dropped]["value"]}, *conv[dropped + 1:turn + 1]]
            assert ids == whole.prompt_ids(kept, turn - dropped, images)
        assert ids.count(image_id) == full.count(image_id) > 0  # the image stays
        question = conv[turn - 1]["value"]
        assert question in processor.tokenizer.decode(ids)[-len(question) - 20:]  # the question ends the prompt
        seen[min(dropped, 2)] += 1
    assert seen[0] and seen[2]  # short prompts kept whole, long ones cut

    model, _ = _model(tiny_run / "run")
    counts = {}
    preds = list(generate(model, processor, _items(tiny_run / "out"), max_new_tokens=2, max_length=max_length,
                          batch_size=8, counts=counts))
    assert len(preds) == 8 and counts["shortened"] == seen[2] and counts["unanswered"] == {}
    assert counts["turns_dropped"] == sum(p["turns_dropped"] for p in preds) > 0
    # below the image + the question nothing fits: no answer, counted
    counts = {}
    assert list(generate(model, processor, _items(tiny_run / "out"), max_new_tokens=2, max_length=12,
                         counts=counts)) == [] and counts["unanswered"] == {"too_long": 8}


def test_generate_cli_summary_out_and_bad_values(tiny_run, tmp_path):
    run, out = tiny_run / "run", tiny_run / "out"
    pred = tmp_path / "pred.jsonl"
    common = ["generate", "--model", run, "--data", out, "--max-new-tokens", "2", "--no-progress"]
    result = run_cli(*common, "--out", pred, "--max-length", "160", "--batch-size", "4", "--limit", "5")
    lines = [json.loads(l) for l in pred.read_text().splitlines()]
    assert len(lines) == 5 and set(lines[0]) == {"id", "index", "turn", "kind", "text", "finished", "turns_dropped"}
    cut = sum(p["turns_dropped"] > 0 for p in lines)
    assert "records: 5  answers: 5" in result.output
    assert f"prompts over --max-length 160: {cut} shortened" in result.output
    assert "answers/s, batch size 4" in result.output and f"output: {pred}" in result.output
    # an existing file is not replaced without --overwrite
    mine = tmp_path / "mine.jsonl"
    mine.write_text("my notes\n")
    refused = run_cli(*common, "--out", mine, expect=2)
    assert "--overwrite" in refused.output and len(refused.output.strip().splitlines()) == 1
    assert mine.read_text() == "my notes\n"
    run_cli(*common, "--out", mine, "--limit", "1", "--overwrite")
    assert len(mine.read_text().splitlines()) == 1 and not list(tmp_path.glob(".*partial"))
    for bad in (["--batch-size", "0"], ["--max-length", "0"], ["--max-new-tokens", "0"], ["--limit", "-1"],
                ["--device", "nosuch"]):
        r = run_cli(*common, "--out", tmp_path / "x.jsonl", *bad, expect=2)
        assert r.output.startswith(f"error: {bad[0]} ") and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "x.jsonl").exists()


def test_generate_overwrite_never_replaces_a_shard_an_image_or_the_input(tiny_run, tmp_path):
    """`--out` naming a shard of --data with --overwrite replaced it (every later command then failed on
    it with a pyarrow traceback); an image or the run's input went the same way."""
    run, out = tiny_run / "run", tiny_run / "out"
    common = ["generate", "--model", run, "--data", out, "--max-new-tokens", "2", "--no-progress", "--overwrite"]
    shard = next((out / "data").iterdir())
    image = next((tiny_run / "src" / "images").iterdir())
    for dest, words in ((shard, "inside the --data folder"), (out / "report.json", "inside the --data folder"),
                        (image, "binary file"), (tiny_run / "src" / "data.json", "the input the --data run read")):
        before = dest.read_bytes()
        refused = run_cli(*common, "--out", dest, expect=2)
        assert words in refused.output and len(refused.output.strip().splitlines()) == 1, refused.output
        assert dest.read_bytes() == before


def test_generate_on_a_lora_run_without_merge_says_so(tiny_run, tmp_path):
    """A LoRA run without --merge-lora holds only adapter/ (tiny's base is not on disk): generate said
    "Unrecognized processing class ... (give a `cogalign train --out` folder)" about a train folder."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "cogalign_train.json").write_text(json.dumps({"vq_tokens": "text", "max_length": 128}))
    res = run_cli("generate", "--model", run, "--data", tiny_run / "out", "--out", tmp_path / "p.jsonl", expect=2)
    assert "LoRA adapter only" in res.output and "--merge-lora" in res.output
    assert len(res.output.strip().splitlines()) == 1
