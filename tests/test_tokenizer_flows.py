"""Issue 15: the tokenizer flows as the README shows them (train -> push, resume, eval with any
spec), the run's identity, and the bad values and messages found by the outside check."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cogalign.cli import app
from cogalign.tokenizers import TokenizerError, load_taming, load_tokenizer
from cogalign.tokenizers.presets import DEMO_DIR
from cogalign.tokenizers.training import train_vq
from tokenizer_fixtures import EXAMPLE_IMAGES, TINY_PARAMS, make_random_taming_state, taming_yaml
from tests.helpers import one_line_error as _one_line_error  # noqa: E402

torch.set_num_threads(1)
IMAGES = [EXAMPLE_IMAGES / "chelsea.png", EXAMPLE_IMAGES / "camera.png"]
TINY = dict(log=None, progress=False, codes=32, ch_mult=(1, 1, 1, 1), batch_size=2, crop=32, kmeans_latents=64)
SMALL = ["--resolution", "64", "--usage-resolution", "64"]
REV = "0123456789abcdef0123456789abcdef01234567"


def _cli(*args, env=None):
    return CliRunner().invoke(app, ["vq", *map(str, args)], env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("flows") / "tr"
    train_vq(IMAGES, out, steps=3, **TINY)
    return out


# ----------------------------------------------------------------------------- #1, #6: train -> push

def test_train_then_push_works_and_the_card_says_what_ran(trained):
    assert (trained / "train_state.pt").is_file()
    r = _cli("push", trained, "--repo", "me/tok", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "left out: train_state.pt" in r.output
    files = r.output.split("would upload to me/tok (public): ")[1].splitlines()[0]
    assert "train_state.pt" not in files and "model.safetensors" in files and "train_metrics.json" in files
    # #6: the card reads train_metrics.json (images is a count) and says what the run did
    assert "Training data: 2 images" in r.output and "not recorded" not in r.output
    assert "--preset demo`, 3 steps of 2 x 32² crops" in r.output
    assert "LPIPS off" in r.output and "PatchGAN off" in r.output


class _Uploads:
    """HfApi at its boundary: keeps what push commits."""

    def __init__(self):
        self.ops = []

    def create_repo(self, repo_id, **kw):
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kw):
        self.ops = list(operations)
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/{REV}"})()


def test_readme_flow_train_push_then_use_from_the_hub(trained, tmp_path, monkeypatch):
    """train -> push -> --vq hf://: the pushed files, served from a hand-built cache, are the tokenizer."""
    from cogalign.tokenizers.hub import push

    api = _Uploads()
    push(trained, "me/tok", api=api)
    snap = tmp_path / "hf" / "models--me--tok" / "snapshots" / REV
    snap.mkdir(parents=True)
    for op in api.ops:
        src = op.path_or_fileobj
        (snap / op.path_in_repo).write_bytes(src if isinstance(src, bytes) else open(src, "rb").read())
    (tmp_path / "hf" / "models--me--tok" / "refs").mkdir()
    (tmp_path / "hf" / "models--me--tok" / "refs" / "main").write_text(REV)
    assert sorted(p.name for p in snap.iterdir()) == ["README.md", "config.yaml", "model.safetensors",
                                                      "train_metrics.json"]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tokenizer_fixtures import photos

    by_hub, by_path = load_tokenizer("hf://me/tok"), load_tokenizer(str(trained))
    assert by_hub.content_hash == by_path.content_hash and by_hub.name == f"me/tok@{REV}"
    np.testing.assert_array_equal(by_hub.encode(photos((64, 64))[:2]), by_path.encode(photos((64, 64))[:2]))


def test_convert_names_a_train_state_and_never_replaces_a_model(trained, tmp_path):
    before = (trained / "model.safetensors").read_bytes()
    r = _cli("convert", trained / "train_state.pt", trained / "model.safetensors")
    _one_line_error(r, "exists")
    r = _cli("convert", trained / "train_state.pt", trained / "model.safetensors", "--force")
    _one_line_error(r, "was not written by `vq convert`")
    r = _cli("convert", trained / "train_state.pt", tmp_path / "x.safetensors", "--config", trained / "config.yaml")
    _one_line_error(r, "resume state of `cogalign vq train`", "model.safetensors")
    assert (trained / "model.safetensors").read_bytes() == before and not (tmp_path / "x.safetensors").exists()


def test_a_train_state_without_config_is_named_as_the_resume_state(trained, tmp_path):
    """The README's `vq convert DIR/train_state.pt OUT` and `--vq DIR/train_state.pt` (no --config) name
    the resume state and the model beside it, not 'not a checkpoint'."""
    r = _cli("convert", trained / "train_state.pt", tmp_path / "x.safetensors")
    _one_line_error(r, "resume state of `cogalign vq train`", str(trained / "model.safetensors"))
    r = _cli("info", trained / "train_state.pt")
    _one_line_error(r, "resume state of `cogalign vq train`", str(trained / "model.safetensors"))
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.yaml").exists()


# ----------------------------------------------------------------------------- #2, #10: resume

def _fake_vgg(path, seed):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(seed)
    features = make_layers(cfgs["D"])
    torch.save({"features." + k: v for k, v in features.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    pytest.importorskip("lpips")
    return _fake_vgg(tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth", 0)


def test_resume_refuses_a_changed_loss(tmp_path, monkeypatch, vgg):
    """#2: LPIPS dropped, or another VGG file, on resume is refused naming it; the same file
    content under another path resumes."""
    monkeypatch.delenv("COGALIGN_LPIPS_VGG", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached VGG16
    kw = dict(TINY, perceptual_weight=1.0)
    out = tmp_path / "run"
    train_vq(IMAGES, out, steps=1, lpips_vgg=str(vgg), **kw)
    with pytest.raises(TokenizerError, match=r"LPIPS on \(VGG16 file sha256 .*now it would be off"):
        train_vq(IMAGES, out, steps=2, resume=True, **kw)
    sd = torch.load(vgg, weights_only=True)
    sd["features.0.bias"] = sd["features.0.bias"] + 1
    other = tmp_path / "other.pth"
    torch.save(sd, other)
    with pytest.raises(TokenizerError, match="LPIPS on .*now it would be on .*same --lpips-vgg"):
        train_vq(IMAGES, out, steps=2, resume=True, lpips_vgg=str(other), **kw)
    moved = shutil.copyfile(vgg, tmp_path / "elsewhere.pth")
    metrics = train_vq(IMAGES, out, steps=2, resume=True, lpips_vgg=str(moved), **kw)
    assert metrics["lpips"] is True and metrics["steps_this_run"] == 1
    # a setting of the loss (here the codebook weight) changed on resume is named
    r = _cli("train", *IMAGES, "--out", out, "--resume", "--steps", "3", "--codes", "32", "--ch-mult", "1,1,1,1",
             "--batch-size", "2", "--crop", "32", "--kmeans-latents", "64", "--codebook-weight", "0.5",
             "--no-eval", "--no-progress")
    _one_line_error(r, "codebook_weight: 1.0 then, 0.5 now")


def test_resumed_metrics_equal_an_uninterrupted_run(tmp_path):
    """#10: the moving train PSNR and the codes-used counter are saved and restored."""
    kw = dict(TINY, log_every=3)
    whole = train_vq(IMAGES, tmp_path / "whole", steps=5, **kw)
    train_vq(IMAGES, tmp_path / "half", steps=2, **kw)
    resumed = train_vq(IMAGES, tmp_path / "half", steps=5, resume=True, **kw)
    assert resumed["final_train_psnr_db"] == whole["final_train_psnr_db"]
    assert resumed["history"] == whole["history"]
    saved = [json.loads((tmp_path / d / "train_metrics.json").read_text()) for d in ("whole", "half")]
    for key in ("final_train_psnr_db", "history"):
        assert saved[0][key] == saved[1][key], key


# ----------------------------------------------------------------------------- #13-15: bad values

@pytest.mark.parametrize("args, words", [
    (["--disc-weight", "nan"], ["--disc-weight nan", "finite"]),
    (["--perceptual-weight", "nan"], ["--perceptual-weight nan", "finite"]),
    (["--commitment-weight", "inf"], ["--commitment-weight inf"]),
    (["--ema-decay", "1.5"], ["--ema-decay 1.5"]),
    (["--batch-size", "100000000"], ["--batch-size 100000000", "GiB", "at most about"]),
])
def test_bad_numbers_are_refused_before_any_work(tmp_path, args, words, monkeypatch):
    import cogalign.tokenizers.training.loop as loop

    monkeypatch.setattr(loop, "collect_images", lambda *a, **k: pytest.fail("images read before the check"))
    r = _cli("train", *IMAGES, "--out", tmp_path / "o", *args, "--no-eval", "--no-progress")
    _one_line_error(r, *words)
    assert not (tmp_path / "o").exists()


def test_non_image_input_is_one_message_before_the_model_is_built(tmp_path, monkeypatch):
    import cogalign.tokenizers.training.loop as loop

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    monkeypatch.setattr(loop, "VQAutoencoder", lambda *a, **k: pytest.fail("model built before the inputs were checked"))
    r = _cli("train", bad, "--out", tmp_path / "o", "--no-eval", "--no-progress")
    line = _one_line_error(r, "none of the 1 images could be decoded", str(bad))
    assert line.count("none of the") == 1


def test_train_flags_reach_the_run(tmp_path):
    """Beyond: --commitment-weight, --codebook-weight and --ema-decay are TrainConfig settings."""
    r = _cli("train", IMAGES[0], "--out", tmp_path / "o", "--steps", "1", "--codes", "32", "--ch-mult", "1,1,1,1",
             "--batch-size", "1", "--crop", "32", "--kmeans-latents", "64", "--commitment-weight", "0.5",
             "--codebook-weight", "2", "--ema-decay", "0.9", "--no-eval", "--no-progress")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "train_metrics.json").read_text())
    assert (m["commitment_weight"], m["codebook_weight"], m["ema_decay"]) == (0.5, 2.0, 0.9)


# ----------------------------------------------------------------------------- #3, #8, #9: one resolver

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """demo's files as hf://alice/tok in a hand-built offline cache (main and refs/pr/1)."""
    cache = tmp_path / "hf"
    repo = cache / "models--alice--tok"
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True)
    for name in ("model.safetensors", "config.yaml"):
        shutil.copyfile(DEMO_DIR / name, snap / name)
    (repo / "refs" / "refs" / "pr").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    (repo / "refs" / "refs" / "pr" / "1").write_text(REV)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COGALIGN_HOME", str(tmp_path / "home"))
    return snap


def test_eval_takes_hub_specs_and_catalog_names(hub, tmp_path):
    by_path = json.loads(_cli("eval", DEMO_DIR, IMAGES[0], *SMALL, "--json", "--no-progress").stdout)
    r = _cli("eval", "hf://alice/tok", IMAGES[0], *SMALL, "--json", "--no-progress")
    assert r.exit_code == 0, r.output
    by_hub = json.loads(r.stdout)
    assert by_hub["tokenizer"] == f"alice/tok@{REV}"
    assert by_hub["psnr_db"] == by_path["psnr_db"] and by_hub["content_hash"] == by_path["content_hash"]
    r = _cli("eval", "ldm-vq-f8", IMAGES[0], *SMALL)  # a catalog name: its own message, not "no such file"
    _one_line_error(r, "ldm-vq-f8 is not installed")
    assert "hf:/" not in r.output.replace("hf://", "")


def test_hub_revision_with_a_slash_and_the_recorded_commit(hub):
    from cogalign.tokenizers.hub import parse_hub_spec

    hs = parse_hub_spec("hf://alice/tok@refs%2Fpr%2F1/sub")
    assert (hs.repo_id, hs.revision, hs.subfolder) == ("alice/tok", "refs/pr/1", "sub")
    assert str(hs) == "hf://alice/tok@refs%2Fpr%2F1/sub"
    assert load_tokenizer("hf://alice/tok@refs%2Fpr%2F1").name == f"alice/tok@{REV}"
    assert load_tokenizer("hf://alice/tok").name == f"alice/tok@{REV}"


def test_same_tokenizer_hash_is_the_same_run():
    """#9: hf://alice/tok and its folder on disk differ in name only: the resume fingerprint is equal."""
    from cogalign.options import ExpandOptions

    base = ExpandOptions(tokenizer_hash="09dcdfe261bfe2ed")
    assert base.replace(tokenizer_name=f"alice/tok@{REV}").fingerprint() == \
        base.replace(tokenizer_name="demo-f8-4096").fingerprint()
    assert base.replace(tokenizer_hash="other").fingerprint() != base.fingerprint()


def test_missing_vqgan_4096_suggests_the_preset(tmp_path, monkeypatch):
    """#5: the suggested command trains the paper's architecture, not demo's."""
    monkeypatch.setenv("COGALIGN_HOME", str(tmp_path))
    monkeypatch.delenv("COGALIGN_VQGAN_4096", raising=False)
    with pytest.raises(TokenizerError, match=r"`cogalign vq train IMAGES --out \S+ --preset vqgan-4096`"):
        load_tokenizer("vqgan-4096")


# ----------------------------------------------------------------------------- #11, #12, #20, Beyond

def test_info_counts_both_halves(trained):
    d = json.loads(_cli("info", trained, "--json").stdout)
    from safetensors.torch import load_file

    sd = load_file(str(trained / "model.safetensors"))
    dec = sum(v.numel() for k, v in sd.items() if k.startswith(("decoder.", "post_quant_conv.")))
    assert d["parameters_encoder"] == load_taming(trained).parameter_count()
    assert d["parameters_decoder"] == dec and d["parameters_total"] == sum(v.numel() for v in sd.values())


NOATTN = {"embed_dim": 3, "n_embed": 64, "ddconfig": {
    "attn_type": "none", "double_z": False, "z_channels": 3, "resolution": 64, "in_channels": 3, "out_ch": 3,
    "ch": 32, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}


def _noattn_modules(seed=0):
    """What latent-diffusion builds for attn_type none: taming's blocks with nn.Identity where
    mid.attn_1 is (its make_attn(..., "none")), so the checkpoint holds no attention weights."""
    import contextlib
    import io

    from taming.modules.diffusionmodules.model import Decoder, Encoder

    torch.manual_seed(seed)
    dd = NOATTN["ddconfig"]
    with contextlib.redirect_stdout(io.StringIO()):
        enc, dec = Encoder(**dd), Decoder(**dd)
    enc.mid.attn_1, dec.mid.attn_1 = torch.nn.Identity(), torch.nn.Identity()
    qc, pqc = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1)
    sd = {f"{name}.{k}": v for name, m in (("encoder", enc), ("decoder", dec), ("quant_conv", qc),
                                           ("post_quant_conv", pqc)) for k, v in m.state_dict().items()}
    sd["quantize.embedding.weight"] = torch.randn(64, 3) * 0.05
    return enc.eval(), qc.eval(), sd


def test_attn_type_none_loads_encodes_and_decodes(tmp_path):
    """#12: taming's Encoder drops attn_type and would expect mid.attn_1 weights."""
    from taming.modules.vqvae.quantize import VectorQuantizer

    from cogalign.tokenizers.decoder import load_decoder
    from tokenizer_fixtures import photos

    enc, qc, sd = _noattn_modules()
    assert not any("attn" in k for k in sd)
    folder = tmp_path / "vq-f4-noattn"
    folder.mkdir()
    torch.save({"state_dict": {"first_stage_model." + k: v for k, v in sd.items()}}, folder / "model.ckpt")
    (folder / "config.yaml").write_text(taming_yaml(NOATTN))
    tok = load_taming(folder)
    assert tok.downsample == 4 and tok.codebook_size == 64
    x = photos((32, 32))[:3]
    vq = VectorQuantizer(64, 3, beta=0.25)
    vq.embedding.weight.data.copy_(sd["quantize.embedding.weight"])
    with torch.no_grad():
        h = qc(enc(torch.from_numpy(x).permute(0, 3, 1, 2).float().contiguous() / 127.5 - 1.0))
        _, _, (_, _, ref) = vq(h)
    np.testing.assert_array_equal(tok.encode(x), ref.view(3, 8, 8).numpy())
    assert load_decoder(folder).decode(tok.encode(x)).shape == x.shape
    r = _cli("convert", folder / "model.ckpt", tmp_path / "c.safetensors")
    assert r.exit_code == 0, r.output


def test_eval_streams_with_quality_and_codebook_statistics(monkeypatch, tmp_path):
    """#20 + Beyond: --max-images, --no-progress, no decode-all-first; SSIM; perplexity, entropy,
    dead codes and the histogram; rFID left out and said so."""
    import cogalign.tokenizers.training.export as export

    decoded = []
    real = export.load_rgb
    monkeypatch.setattr(export, "load_rgb", lambda ref: decoded.append(ref.name) or real(ref))
    enc = []
    real_encode = type(load_tokenizer("demo")).encode

    def spy(self, x):
        enc.append(len(decoded))
        return real_encode(self, x)

    monkeypatch.setattr(type(load_tokenizer("demo")), "encode", spy)
    r = _cli("eval", "demo", EXAMPLE_IMAGES, *SMALL, "--max-images", "3", "--json", "--no-progress")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["images"] == 3 and len(decoded) == 3
    assert enc[0] == 1  # the first image is encoded before the second is decoded
    hist = np.array(res["code_histogram"])
    assert hist.size == 4096 and hist.sum() == res["indices_counted"] == 3 * (64 // 8) ** 2
    p = hist[hist > 0] / hist.sum()
    assert res["codes_used"] == (hist > 0).sum() and res["dead_codes"] == 4096 - res["codes_used"]
    assert res["entropy_bits"] == pytest.approx(float(-(p * np.log2(p)).sum()))
    assert res["perplexity"] == pytest.approx(2 ** res["entropy_bits"])
    assert 0 < res["ssim"] <= 1 and res["rfid"] is None and any("rfid" in n for n in res["notes"])
    r = _cli("eval", "demo", IMAGES[0], *SMALL, "--no-progress")
    assert "ssim at 64px:" in r.output and "perplexity" in r.output and "dead codes" in r.output


def test_eval_lpips_with_vgg_weights(vgg):
    res = json.loads(_cli("eval", "demo", IMAGES[0], *SMALL, "--json", "--no-progress", "--lpips-vgg", vgg).stdout)
    assert res["lpips"] is not None and res["lpips"] > 0 and math.isfinite(res["lpips"])


def test_vq_list_has_the_new_catalog_entries():
    r = _cli("list", "--json")
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert (rows["ldm-vq-f16"]["codes"], rows["ldm-vq-f16"]["f"], rows["ldm-vq-f16"]["embed_dim"]) == (16384, 16, 8)
    assert (rows["ldm-vq-f4-noattn"]["codes"], rows["ldm-vq-f4-noattn"]["f"]) == (8192, 4)
    assert (rows["taming-openimages-gumbel-f8"]["codes"], rows["taming-openimages-gumbel-f8"]["f"]) == (8192, 8)


def test_gumbel_layout_under_checkpoints_folder(tmp_path, monkeypatch):
    """taming's vqgan_gumbel_f8 folder (checkpoints/last.ckpt + configs/model.yaml) is found by name,
    and its geometry checked against the catalog."""
    params = dict(TINY_PARAMS, n_embed=8192)
    sd = make_random_taming_state(params, gumbel=True)
    folder = tmp_path / "home" / "tokenizers" / "taming-openimages-gumbel-f8"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "configs").mkdir()
    torch.save({"state_dict": sd}, folder / "checkpoints" / "last.ckpt")
    (folder / "configs" / "model.yaml").write_text(taming_yaml(params, target="taming.models.vqgan.GumbelVQ"))
    monkeypatch.setenv("COGALIGN_HOME", str(tmp_path / "home"))
    with pytest.raises(TokenizerError, match=r"embed_dim 4 \(catalog: 256\)"):
        load_tokenizer("taming-openimages-gumbel-f8")
    tok = load_taming(folder)
    assert tok.quantizer == "gumbel" and tok.codebook_size == 8192


def test_raw_pickle_refusal_is_the_only_line(tmp_path, capsys):
    """#17: torch's "Detected pickle protocol 4" UserWarning no longer comes before the refusal."""
    import os
    import pickle

    from cogalign.cli import main

    class Hostile:
        def __reduce__(self):
            return (os.system, ("echo HACKED",))

    folder = tmp_path / "raw"
    folder.mkdir()
    with open(folder / "model.pth", "wb") as fh:
        pickle.dump({"x": Hostile()}, fh, protocol=4)
    (folder / "config.yaml").write_text(taming_yaml())
    with pytest.raises(SystemExit) as exc:
        main(["vq", "info", str(folder)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--trust-pickle" in err
