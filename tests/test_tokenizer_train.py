"""`train_vq` -> export -> `load_taming` round trip, and the `cogalign vq` commands."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cogalign.cli.vq import vq_app
from cogalign.tokenizers import load_taming, load_tokenizer
from cogalign.tokenizers.training import evaluate, export_taming, to_model_input, train_vq
from tokenizer_fixtures import (
    EXAMPLE_IMAGES, TINY_PARAMS, lightning_checkpoint, make_random_taming_state, photos, taming_yaml)
from tests.helpers import one_line_error as _one_line_error  # noqa: E402

torch.set_num_threads(1)
TRAIN_IMAGES = [EXAMPLE_IMAGES / "chelsea.png", EXAMPLE_IMAGES / "camera.png"]  # one RGB, one greyscale


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("vq") / "tiny"
    logs = []
    metrics = train_vq(TRAIN_IMAGES, out, codes=64, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1,
                       steps=4, batch_size=2, crop=32, seed=0, threads=1, log=logs.append, log_every=2,
                       progress=False)
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
    assert f"parameters_encoder: {tok.parameter_count()}" in r.output
    started = next(line for line in trained[2] if line.startswith("vq train: preset"))
    assert f"trainable parameters + {64 * tok.embed_dim:,} codebook values (EMA)" in started  # a buffer: vq info counts it
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


# --------------------------------------------------------------------------- issue 7: the vq commands

SMALL = ["--codes", "16", "--ch-mult", "1,1,1,1", "--steps", "1", "--batch-size", "1", "--crop", "16",
         "--no-eval", "--no-progress"]


def test_train_refuses_to_overwrite_out_without_force(tmp_path):
    runner = CliRunner()
    out = tmp_path / "tok"
    assert runner.invoke(vq_app, ["train", str(TRAIN_IMAGES[0]), "--out", str(out), *SMALL]).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    r = runner.invoke(vq_app, ["train", str(TRAIN_IMAGES[0]), "--out", str(out), *SMALL, "--seed", "1"])
    _one_line_error(r, "--force", "--resume")
    assert (out / "model.safetensors").read_bytes() == before
    (out / "notes.txt").write_text("mine")
    r = runner.invoke(vq_app, ["train", str(TRAIN_IMAGES[0]), "--out", str(out), *SMALL, "--seed", "1", "--force"])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").read_bytes() != before and (out / "notes.txt").read_text() == "mine"
    # another checkpoint in the folder would make `--vq OUT` ambiguous: refused even with --force
    (out / "other.ckpt").write_bytes(b"x")
    r = runner.invoke(vq_app, ["train", str(TRAIN_IMAGES[0]), "--out", str(out), *SMALL, "--force"])
    _one_line_error(r, "other.ckpt")


def test_eval_finds_a_decoder_under_a_prefix(tmp_path):
    """latent diffusion stores the VQGAN as first_stage_model.*: eval must see its decoder."""
    sd = make_random_taming_state(TINY_PARAMS, seed=3)
    src = tmp_path / "ldm"
    src.mkdir()
    torch.save({"state_dict": {"first_stage_model." + k: v for k, v in sd.items()}}, src / "model.ckpt")
    (src / "config.yaml").write_text(taming_yaml())
    res = evaluate(src, TRAIN_IMAGES, resolution=64, usage_resolution=64)
    assert res["psnr_db"] is not None and 0 < res["psnr_db"] < 60
    plain = tmp_path / "plain"
    plain.mkdir()
    torch.save({"state_dict": sd}, plain / "model.ckpt")
    (plain / "config.yaml").write_text(taming_yaml())
    assert evaluate(plain, TRAIN_IMAGES, resolution=64, usage_resolution=64)["psnr_db"] == res["psnr_db"]


@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], ["--steps 0"]),
    (["--batch-size", "0"], ["--batch-size 0"]),
    (["--crop", "0"], ["--crop 0"]),
    (["--crop", "12"], ["--crop 12", "f=8"]),
    (["--codes", "0"], ["--codes 0"]),
    (["--lr", "-1"], ["--lr -1"]),
    (["--lr", "nan"], ["--lr nan"]),
    (["--lr", "inf"], ["--lr inf"]),
    (["--seed", "-1"], ["--seed -1"]),
    (["--disc-start", "-5"], ["--disc-start -5"]),
    (["--ch", "48"], ["--ch 48"]),
    (["--device", "cuda"], ["--device cuda"]),
    (["--device", "tpu"], ["--device 'tpu'"]),
    (["--preset", "huge"], ["--preset 'huge'"]),
])
def test_train_bad_numbers_fail_in_one_line_before_any_work(tmp_path, args, words):
    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    out = tmp_path / "tok"
    base = ["train", str(TRAIN_IMAGES[0]), "--out", str(out), "--steps", "1", "--no-eval", "--no-progress"]
    r = CliRunner().invoke(vq_app, base + args)
    _one_line_error(r, *words)
    assert not out.exists()


def test_train_out_naming_a_file_fails_before_training(tmp_path):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"not a folder")
    r = CliRunner().invoke(vq_app, ["train", str(TRAIN_IMAGES[0]), "--out", str(out), "--steps", "100000"])
    _one_line_error(r, "is a file")


@pytest.mark.parametrize("flag", ["--resolution", "--usage-resolution"])
@pytest.mark.parametrize("value", ["0", "-8", "12"])
def test_eval_bad_resolution_fails_in_one_line(flag, value):
    r = CliRunner().invoke(vq_app, ["eval", "demo", str(TRAIN_IMAGES[0]), flag, value])
    _one_line_error(r, f"{flag} {value}")


def test_eval_json_keeps_images_with_the_same_name(tmp_path):
    from PIL import Image

    for folder, src in (("a", TRAIN_IMAGES[0]), ("b", TRAIN_IMAGES[1])):
        (tmp_path / folder).mkdir()
        Image.open(src).convert("RGB").resize((64, 64)).save(tmp_path / folder / "x.png")
    r = CliRunner().invoke(vq_app, ["eval", "demo", str(tmp_path / "a"), str(tmp_path / "b"), "--json",
                                    "--resolution", "64", "--usage-resolution", "64"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["images"] == 2
    assert sorted(res["psnr_db_per_image"]) == [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png")]
    vals = list(res["psnr_db_per_image"].values())
    assert res["psnr_db"] == pytest.approx(sum(vals) / 2, abs=0.01)


# --------------------------------------------------------------------------- issue 10: the VQGAN recipe

def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_resume_continues_the_same_run(tmp_path):
    """4 steps in one run == 2 steps, then --resume to 4: same steps, data order, weights (GAN on)."""
    kw = dict(log=None, progress=False, codes=32, ch_mult=(1, 1, 1, 1), batch_size=2, crop=32, disc_weight=0.5,
              disc_start=1, kmeans_latents=64, log_every=1)
    whole = train_vq(TRAIN_IMAGES, tmp_path / "whole", steps=4, **kw)
    half = train_vq(TRAIN_IMAGES, tmp_path / "half", steps=2, **kw)
    assert half["history"]["step"] == [0, 1]
    resumed = train_vq(TRAIN_IMAGES, tmp_path / "half", steps=4, resume=True, **kw)
    assert resumed["steps_this_run"] == 2
    assert resumed["history"]["step"] == whole["history"]["step"] == [0, 1, 2, 3]
    assert resumed["history"]["loss"] == whole["history"]["loss"]
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "half")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # a resume with other settings, or past the end, is refused in one line
    r = CliRunner().invoke(vq_app, ["train", *map(str, TRAIN_IMAGES), "--out", str(tmp_path / "half"), "--resume",
                                    "--steps", "6", "--codes", "64", "--ch-mult", "1,1,1,1", "--no-eval"])
    _one_line_error(r, "codes")
    with pytest.raises(Exception, match="already at step 4"):
        train_vq(TRAIN_IMAGES, tmp_path / "half", steps=4, resume=True, **kw)


def test_torchrun_two_ranks_keep_one_codebook(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp"
    script = Path(__file__).with_name("vq_train_ddp.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(script), str(TRAIN_IMAGES[0].parent), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "broadcast_buffers" not in proc.stderr, proc.stderr[-3000:]  # issue 15 #17: no FutureWarning per rank
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["equal"] and r1["equal"]
    assert r0["codebook"] == r1["codebook"] and r0["weights"] == r1["weights"]
    assert load_taming(out).codebook_size == 32  # rank 0 exported


def test_vqgan_4096_preset_trains_with_the_gan_and_encodes_through_expand(tmp_path, monkeypatch):
    """issue 15 #4: the preset's loss follows latent-diffusion's vq-f8 config (disc_start 1,
    disc_weight 0.6, 2 layers), so the documented command trains the GAN; a loss it cannot run
    (no VGG weights: no LPIPS) is said at the start and in train_metrics.json."""
    import yaml

    from helpers import EXAMPLES, FAST, run_cli

    out = tmp_path / "vqgan"
    r = CliRunner().invoke(vq_app, ["train", str(EXAMPLES), "--out", str(out), "--preset", "vqgan-4096",
                                    "--steps", "2", "--batch-size", "1", "--crop", "16",
                                    "--kmeans-latents", "256", "--no-progress", "--no-eval"],
                              env={"COGALIGN_LPIPS_VGG": "", "TORCH_HOME": str(tmp_path / "no-torch-home")})
    assert r.exit_code == 0, r.output
    assert "NOTE: no LPIPS" in r.output.split("vq train: preset")[0]  # said before training starts
    assert "GAN from step 1" in r.output
    assert "13 images" in r.output and "1 records gave no image (text_only: 1)" in r.output
    p = yaml.safe_load((out / "config.yaml").read_text())["model"]["params"]
    assert p["n_embed"] == 4096 and p["embed_dim"] == 4
    dd = p["ddconfig"]
    assert (dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"], dd["attn_resolutions"]) == (
        128, [1, 2, 2, 4], 2, 4, [32])
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["preset"] == "vqgan-4096" and metrics["steps"] == 2
    assert (metrics["disc_weight"], metrics["disc_start"], metrics["disc_layers"]) == (0.6, 1, 2)
    assert metrics["gan_steps"] == 1 and metrics["lpips"] is False
    assert [s.split(":")[0] for s in metrics["losses_skipped"]] == ["no LPIPS"]
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors", "train_metrics.json",
                                                      "train_state.pt"]
    tok = load_taming(out)
    assert tok.codebook_size == 4096 and tok.downsample == 8
    res = run_cli("expand", EXAMPLES, "--out", tmp_path / "expanded", "--vq", out, *FAST, "--workers", "0")
    report = json.loads((tmp_path / "expanded" / "report.json").read_text())
    assert report["input"] == 14 and report["expanded"] == 13, res.output
    assert tok.content_hash in (tmp_path / "expanded" / "report.json").read_text() + res.output


def test_images_from_llava_json_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cogalign.tokenizers.training.data import CropBatches, collect_images
    from helpers import EXAMPLES

    got = collect_images([EXAMPLES])
    assert len(got.refs) == 13 and dict(got.skipped) == {"text_only": 1}
    assert got.refs[0].path == EXAMPLES.parent / "images" / "astronaut.png"
    raw = (EXAMPLE_IMAGES / "chelsea.png").read_bytes()
    table = pa.table({"id": ["a", "b", "c", "d"],
                      "image": [{"bytes": raw, "path": None}, {"bytes": None, "path": "images/camera.png"},
                                None, {"bytes": None, "path": "../escape.png"}]})
    pq.write_table(table, tmp_path / "hf.parquet")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "camera.png").write_bytes((EXAMPLE_IMAGES / "camera.png").read_bytes())
    got = collect_images([tmp_path / "hf.parquet"])
    assert len(got.refs) == 2 and got.refs[0].data == raw
    assert dict(got.skipped) == {"text_only": 1, "image_path_escapes_root": 1}
    from cogalign.inputs.images import load_image

    b = CropBatches(got.refs, 32, 2, seed=0)
    np.testing.assert_array_equal(b.image(0), np.asarray(load_image(EXAMPLE_IMAGES / "chelsea.png")))
    np.testing.assert_array_equal(b[5], CropBatches(got.refs, 32, 2, seed=0)[5])  # fixed by (seed, rank, step)
    assert not np.array_equal(b[5], b[6])


def test_lpips_from_a_local_vgg_file(tmp_path):
    pytest.importorskip("lpips")
    from torchvision.models.vgg import cfgs, make_layers

    from cogalign.tokenizers.training.losses import find_vgg_weights, load_lpips

    torch.manual_seed(0)
    features = make_layers(cfgs["D"])  # vgg16().features, without building the classifier
    path = tmp_path / "vgg16-397923af.pth"
    torch.save({"features." + k: v for k, v in features.state_dict().items()}, path)  # the trunk is enough
    assert find_vgg_weights(path) == path
    model = load_lpips(path)
    torch.testing.assert_close(model.net.slice1[0].weight, features[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(getattr(model.net.slice5, "28").bias, features[28].bias, rtol=0, atol=0)
    x = to_model_input(photos((32, 32))[:2])
    assert float(model(x, x).abs().max()) == 0.0 and float(model(x, x.flip(0)).min()) > 0
    with pytest.raises(Exception, match="no such file"):
        find_vgg_weights(tmp_path / "missing.pth")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(Exception, match="not torchvision's VGG16"):
        load_lpips(tmp_path / "other.pth")


def test_same_seed_same_bytes_with_or_without_loader_workers(tmp_path):
    args = [*SMALL, "--steps", "2", "--batch-size", "2"]
    for name, extra in (("w0", []), ("w2", ["--workers", "2"])):
        r = CliRunner().invoke(vq_app, ["train", str(EXAMPLE_IMAGES), "--out", str(tmp_path / name), *args, *extra])
        assert r.exit_code == 0, r.output
    assert (tmp_path / "w0" / "model.safetensors").read_bytes() == (tmp_path / "w2" / "model.safetensors").read_bytes()
