"""`train_vq` -> export -> `load_taming` round trip, and the `cogalign vq` commands."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cogalign.cli_vq import vq_app
from cogalign.tokenizers import load_taming, load_tokenizer
from cogalign.tokenizers.train import evaluate, export_taming, to_model_input, train_vq
from tokenizer_fixtures import (
    EXAMPLE_IMAGES, TINY_PARAMS, lightning_checkpoint, make_random_taming_state, photos, taming_yaml)

torch.set_num_threads(1)
TRAIN_IMAGES = [EXAMPLE_IMAGES / "chelsea.png", EXAMPLE_IMAGES / "camera.png"]  # one RGB, one greyscale


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("vq") / "tiny"
    logs = []
    metrics = train_vq(TRAIN_IMAGES, out, codes=64, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1,
                       steps=4, batch_size=2, crop=32, seed=0, threads=1, log=logs.append, log_every=2)
    return out, metrics, logs


def test_export_layout(trained):
    out, metrics, logs = trained
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    from safetensors.torch import load_file
    import yaml

    sd = load_file(str(out / "model.safetensors"))
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"encoder", "decoder", "quant_conv", "post_quant_conv", "quantize"}
    assert sd["quantize.embedding.weight"].shape == (64, 4)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["target"] == "taming.models.vqgan.VQModel"
    p = cfg["model"]["params"]
    assert p["n_embed"] == 64 and p["embed_dim"] == 4
    assert p["ddconfig"]["double_z"] is False and p["ddconfig"]["ch_mult"] == [1, 1, 1, 1]
    assert p["ddconfig"]["in_channels"] == 3 and p["ddconfig"]["out_ch"] == 3
    saved = json.loads((out / "train_metrics.json").read_text())
    assert saved["steps"] == 4 and saved["codes"] == 64
    assert any("step" in line for line in logs)


def test_exported_indices_match_training_quantizer(trained):
    """load_taming's nearest-code indices == VectorQuantize (Euclidean) indices at training time."""
    out, metrics, _ = trained
    model = metrics["model"].eval()
    tok = load_taming(out)
    assert tok.downsample == 8 and tok.codebook_size == 64
    agree = total = 0
    for size in ((64, 64), (128, 96)):
        imgs = photos(size)
        with torch.no_grad():
            h = model.quant_conv(model.encoder(to_model_input(imgs)))
            _, ref, _ = model.vq(h)
        got = tok.encode(imgs)
        assert got.shape == tuple(ref.shape)
        agree += int((got == ref.numpy()).sum())
        total += got.size
    assert len(np.unique(got)) > 4
    print(f"\ntraining VectorQuantize vs load_taming index agreement: {agree}/{total}")
    assert agree / total >= 0.999
    # the exported codebook is the VectorQuantize codebook, unchanged by eval-mode encoding
    torch.testing.assert_close(tok.quantize.embedding.weight, model.codebook.detach(), rtol=0, atol=0)


def test_float16_decoder_keeps_encoder_exact(trained, tmp_path):
    out, metrics, _ = trained
    model = metrics["model"]
    export_taming(model, tmp_path / "half", decoder_dtype=torch.float16)
    a, b = load_taming(out), load_taming(tmp_path / "half")
    assert a.content_hash == b.content_hash  # the encoder path is float32 in both
    res = evaluate(tmp_path / "half", TRAIN_IMAGES, resolution=64, usage_resolution=64)
    assert res["psnr_db"] is not None and 3 < res["psnr_db"] < 60
    assert 0 < res["codebook_usage"] <= 1 and res["codes_used"] <= 64


def test_cli_info_and_eval(trained):
    out, _, _ = trained
    runner = CliRunner()
    r = runner.invoke(vq_app, ["info", str(out)])
    assert r.exit_code == 0, r.output
    tok = load_taming(out)
    assert f"content_hash: {tok.content_hash}" in r.output
    assert "codebook_size: 64" in r.output and "downsample: 8" in r.output
    assert f"parameters: {tok.parameter_count()}" in r.output
    r = runner.invoke(vq_app, ["info", str(out), "--json"])
    assert json.loads(r.stdout)["name"] == "tiny"
    r = runner.invoke(vq_app, ["eval", str(out), *map(str, TRAIN_IMAGES), "--resolution", "64", "--usage-resolution", "64"])
    assert r.exit_code == 0, r.output
    assert "psnr at 64px:" in r.output and "codebook usage at 64px:" in r.output
    r = runner.invoke(vq_app, ["info", "no/such/thing"])
    assert r.exit_code == 2 and "not a preset" in r.output


def test_cli_convert_pickled_lightning_checkpoint(tmp_path):
    sd = make_random_taming_state(TINY_PARAMS, seed=1)
    src = tmp_path / "run"
    src.mkdir()
    torch.save(lightning_checkpoint(sd, {"hyper_parameters": argparse.Namespace(lr=1e-4)}), src / "last.ckpt")
    (src / "config.yaml").write_text(taming_yaml())
    runner = CliRunner()
    dst = tmp_path / "out" / "vqgan.safetensors"
    r = runner.invoke(vq_app, ["convert", str(src / "last.ckpt"), str(dst)])
    assert r.exit_code == 2 and "--trust-pickle" in r.output and not dst.exists()
    r = runner.invoke(vq_app, ["convert", str(src / "last.ckpt"), str(dst), "--trust-pickle"])
    assert r.exit_code == 0, r.output
    assert dst.is_file() and dst.with_suffix(".yaml").is_file()
    from safetensors.torch import load_file

    keys = set(load_file(str(dst)))
    assert not any(k.startswith("loss.") for k in keys) and any(k.startswith("decoder.") for k in keys)
    converted = load_taming(dst)  # no pickle any more
    original = load_taming(src, trust_pickle=True)
    assert converted.content_hash == original.content_hash
    imgs = photos((64, 64))[:4]
    np.testing.assert_array_equal(converted.encode(imgs), original.encode(imgs))
    r = runner.invoke(vq_app, ["convert", str(src / "last.ckpt"), str(dst), "--trust-pickle"])
    assert r.exit_code == 2 and "--force" in r.output


def test_cli_info_demo():
    r = CliRunner().invoke(vq_app, ["info", "demo"])
    assert r.exit_code == 0, r.output
    assert "name: demo-f8-4096" in r.output and "codebook_size: 4096" in r.output
    assert load_tokenizer("demo").content_hash in r.output
