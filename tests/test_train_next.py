"""LLaVA-NeXT (anyres, image_sizes, per-image token counts), the whole image under --resize,
embedded and multi-image records, `<image>` in an answer, and --print-sample."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from cogalign.train.collate import Collator, Encoder  # noqa: E402
from cogalign.train.data import ShardDataset  # noqa: E402
from tests.helpers import run_cli  # noqa: E402

SIZES = [(96, 48), (32, 32), (40, 72), (64, 32)]  # (width, height)


def red_quarter(w: int = 96, h: int = 48) -> Image.Image:
    """Blue, with the left quarter pure red."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, :, 2] = 255
    arr[:, : w // 4] = (255, 0, 0)
    return Image.fromarray(arr)


def leak_item(position: int) -> dict:
    """A record with `<image>` in a gpt answer, as an item: expand rejects it (image_count_mismatch),
    but the collator must still skip one that reaches it (an older or hand-edited output)."""
    record = {"id": "leak", "image": "images/im1.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "It shows <image> here."}]}
    return {"position": position, "record": record, "images": [red_quarter()], "skip": None}


def make_source(root, extras: bool = True):
    """Records with images of several shapes; with `extras`, a two-image record and one with
    `<image>` in an answer."""
    (root / "images").mkdir(parents=True)
    records = []
    for i, (w, h) in enumerate(SIZES):
        red_quarter(w, h).save(root / "images" / f"im{i}.png")
        records.append({"id": f"r{i}", "image": f"images/im{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Red and blue."}]})
    if extras:
        records.append({"id": "two", "image": ["images/im0.png", "images/im1.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Alike."}]})
    (root / "data.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("next"))


def expand(source, out, *extra):
    templates = source / "templates.json"
    templates.write_text(json.dumps({"vq": ["VQ of this image?"], "px": ["RGB of this image?"]}))
    run_cli("expand", source / "data.json", "--out", out, "--targets", "px", "--px-resolution", "2",
            "--templates", templates, "--workers", "0", "--no-progress", *extra)
    return out


@pytest.fixture(scope="module")
def out(source):
    return expand(source, source / "out")


def test_tiny_next_trains_with_image_sizes_and_per_image_counts(out):
    import torch

    from cogalign.train.model import load

    model, processor = load("tiny-next", out, tiny_layers=1, tiny_hidden=32)
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    enc = Encoder(processor, 4096, resize="stretch")
    items = list(ShardDataset(out, shuffle=False))
    # expand rejects a gpt answer holding <image> (image_count_mismatch); the trainer still skips one
    # that reaches it (an older or hand-edited output)
    items.append(leak_item(len(items)))
    batch = Collator(enc)(items)
    assert batch["stats"]["seen"] == 5 and dict(batch["stats"]["skipped"]) == {"image_token_in_answer": 1}
    assert batch["image_sizes"].tolist()[:len(SIZES)] == [[h, w] for w, h in SIZES]
    counts = enc.image_counts([red_quarter(w, h) for w, h in SIZES])
    assert len(set(counts)) > 1  # anyres: the count follows the image's shape
    per_row = (batch["input_ids"] == enc.image_id).sum(1).tolist()
    assert per_row == counts + [counts[0] + counts[1]]  # the two-image record: both images, both counts
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_tiny_next_cli_trains_and_the_run_loads(out, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run = tmp_path / "run"
    run_cli("train", "--model", "tiny-next", "--data", out, "--out", run, "--max-steps", "1",
            "--global-batch-size", "6", "--per-device-batch-size", "6", "--no-progress")
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["seen"] == 5 and not summary["skipped_by_reason"]
    assert type(AutoModelForImageTextToText.from_pretrained(run)).__name__ == "LlavaNextForConditionalGeneration"
    assert AutoProcessor.from_pretrained(run).image_processor.do_center_crop is False


def unnormalize(pixels, ip) -> np.ndarray:
    mean, std = np.array(ip.image_mean)[:, None, None], np.array(ip.image_std)[:, None, None]
    return ((pixels.numpy() * std + mean) * 255).round()


@pytest.mark.parametrize("resize", ["stretch", "pad", "crop"])
def test_the_model_sees_the_whole_image(tmp_path, resize):
    """A 96×48 image whose left quarter is red: the pixels cover all of it (no centre crop), and
    the processor saved in RUN shows the model the same pixels."""
    from transformers import AutoProcessor

    out = expand(make_source(tmp_path / "src", extras=False), tmp_path / "out", "--resize", resize)
    run = tmp_path / "run"
    run_cli("train", "--model", "tiny", "--data", out, "--out", run, "--max-steps", "1",
            "--global-batch-size", "4", "--per-device-batch-size", "4", "--no-progress")
    saved = AutoProcessor.from_pretrained(run).image_processor
    pixels = saved([red_quarter()], return_tensors="pt")["pixel_values"][0]
    img = unnormalize(pixels, saved)  # (3, 32, 32): what the model sees at inference
    red = (img[0] > 200) & (img[2] < 60)
    blue = (img[2] > 200) & (img[0] < 60)
    cols = red.any(0)
    if resize == "crop":  # expand's `crop` targets describe the centre square: the model sees that square
        assert not red.any() and blue.all()
    else:
        assert cols[:7].all() and not cols[9:].any()  # the red quarter: 8 of 32 columns
        assert blue[:, 9:].any(0).all()  # and the blue rest up to the right edge
    rows = (red | blue).any(1)
    if resize == "stretch":
        assert rows.all()
    elif resize == "pad":  # expand2square: the 96×48 image in the middle half, the mean colour above and below
        assert rows[9:23].all() and not rows[:7].any() and not rows[25:].any()
        assert tuple(img[:, 0, 16]) == pytest.approx((122, 116, 104), abs=2)
    # and training saw the same pixels
    from cogalign.train.model import resize_mode, shard_texts, tiny_processor, train_tokenizer

    assert resize_mode(out) == resize
    enc = Encoder(tiny_processor(train_tokenizer(shard_texts(out), 300)), 512, resize=resize_mode(out))
    assert np.array_equal(enc.pixels([red_quarter()])["pixel_values"][0].numpy(), pixels.numpy())


def test_embedded_images_are_read_from_the_bytes(source, tmp_path):
    import torch

    out = expand(source, tmp_path / "out", "--embed-images")
    moved = tmp_path / "gone"
    shutil.copytree(source / "images", moved)
    shutil.rmtree(source / "images")
    try:
        items = list(ShardDataset(out, shuffle=False, image_root=tmp_path / "empty"))
    finally:
        shutil.copytree(moved, source / "images")
    by_id = {it["record"]["id"]: it for it in items}
    for i, (w, h) in enumerate(SIZES):  # every image decoded from the shard's bytes
        assert by_id[f"r{i}"]["skip"] is None and by_id[f"r{i}"]["images"][0].size == (w, h)
    # a list `image`: every image is embedded (the `images` column), so both decode with the files gone
    assert by_id["two"]["skip"] is None and [im.size for im in by_id["two"]["images"]] == [SIZES[0], SIZES[1]]
    from cogalign.train.model import shard_texts, tiny_processor, train_tokenizer

    batch = Collator(Encoder(tiny_processor(train_tokenizer(shard_texts(out), 300)), 512))(items)
    assert batch["stats"]["seen"] == 5 and batch["pixel_values"].shape[0] == 6
    assert not batch["stats"]["skipped"]
    assert isinstance(batch["pixel_values"], torch.Tensor)


def test_multi_image_record_and_image_token_in_answer(out):
    from cogalign.train.model import tiny_model, tiny_processor, train_tokenizer, shard_texts

    processor = tiny_processor(train_tokenizer(shard_texts(out), 300))
    enc = Encoder(processor, 4096, resize="stretch")
    items = {it["record"]["id"]: it for it in ShardDataset(out, shuffle=False)}
    assert len(items["two"]["images"]) == 2
    batch = Collator(enc)([items["two"], leak_item(len(items)), items["r0"]])
    assert dict(batch["stats"]["skipped"]) == {"image_token_in_answer": 1} and batch["stats"]["seen"] == 2
    assert batch["pixel_values"].shape[0] == 3
    assert (batch["input_ids"] == enc.image_id).sum(1).tolist() == [32, 16]
    model = tiny_model(processor.tokenizer, layers=1, hidden=32)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    # one `<image>` for two images: skipped with a reason, never trained text-only
    one = {**items["two"], "record": {**items["two"]["record"], "conversations": [
        {"from": "human", "value": "<image>\nCompare."}, {"from": "gpt", "value": "Alike."}]}}
    assert dict(Collator(enc)([one])["stats"]["skipped"]) == {"image_token_mismatch": 1}


def test_print_sample_renders_a_record_as_training_does(out):
    res = run_cli("train", "--model", "tiny", "--data", out, "--print-sample", "0")
    sample = json.loads(res.stdout)
    assert list(sample) == ["id", "input_text", "supervised", "image_tokens"]
    assert sample["id"] == "r0" and sample["image_tokens"] == 16
    assert [s.strip() for s in sample["supervised"]] == ["Red and blue.</s>", "<rgb start>" + sample["supervised"][1]
                                                         .split("<rgb start>")[1]]
    assert sample["supervised"][1].endswith("<rgb end></s>")
    assert sample["input_text"].startswith("<s>A chat between") and sample["input_text"].count("<image>") == 16
    assert "ASSISTANT: Red and blue.</s>USER: RGB of " in sample["input_text"]
    res = run_cli("train", "--model", "tiny", "--data", out, "--print-sample", "5", expect=2)
    assert "holds records 0 to 4" in res.output  # one line naming the range (the leak record is rejected by expand)


def test_hub_parquet_input_images_are_read_from_its_bytes(tmp_path):
    """A Hub-style parquet input (`image` as {bytes, path}) expanded without --embed-images: the
    output keeps the path only, and training reads the bytes back from the input."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, (w, h) in enumerate(SIZES):
        buf = io.BytesIO()
        red_quarter(w, h).save(buf, format="PNG")
        rows.append({"id": f"h{i}", "image": {"bytes": buf.getvalue(), "path": f"nowhere/h{i}.png"},
                     "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                       {"from": "gpt", "value": "Red and blue."}]})
    (tmp_path / "hub").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hub" / "train.parquet")
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({"vq": ["VQ of this image?"], "px": ["RGB of this image?"]}))
    out = tmp_path / "out"
    run_cli("expand", tmp_path / "hub" / "train.parquet", "--out", out, "--targets", "px", "--px-resolution", "2",
            "--templates", templates, "--workers", "0", "--no-progress")
    items = list(ShardDataset(out, shuffle=False))
    assert [it["skip"] for it in items] == [None] * len(SIZES)
    assert [it["images"][0].size for it in items] == SIZES
