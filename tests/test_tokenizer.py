"""Tokenizer loading and encoding: taming checkpoints in the layouts users have, agreement
with taming's own modules, strict key/shape checks, pickle refusal, presets, the demo."""
from __future__ import annotations

import argparse
import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cogalign.errors import CogalignError
from cogalign.tokenizers import (
    TamingVQTokenizer, TokenizerError, VQTokenizer, list_presets, load_taming, load_tokenizer)
from cogalign.tokenizers import taming as taming_mod
from tokenizer_fixtures import (
    TINY_PARAMS, lightning_checkpoint, lightning_yaml, make_random_taming_state, photos, reference_indices,
    save_with_unimportable_object, taming_yaml)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def state():
    return make_random_taming_state(TINY_PARAMS, seed=0)


@pytest.fixture(scope="module")
def test_images():
    """Real photos at two sizes: 13 x 64x64 and 13 x 96x128 (HxW)."""
    return [photos((64, 64)), photos((128, 96))]


def _write_run_dir(root, sd):
    """taming's log layout: <run>/ckpts/last.ckpt, <run>/configs/*-project.yaml and *-lightning.yaml."""
    (root / "ckpts").mkdir(parents=True)
    (root / "configs").mkdir()
    torch.save(lightning_checkpoint(sd), root / "ckpts" / "last.ckpt")
    (root / "configs" / "2021-01-01T00-00-00-project.yaml").write_text(taming_yaml())
    (root / "configs" / "2021-01-01T00-00-00-lightning.yaml").write_text(lightning_yaml())
    return root


# ---------------------------------------------------------------------------------------
# Agreement with taming
# ---------------------------------------------------------------------------------------

def test_indices_match_taming_in_every_layout(tmp_path, state, test_images):
    """Lightning run folder, .ckpt with yaml beside, .pth with a bare-params yaml, and
    .safetensors: all load to the same weights, and their indices are taming's
    Encoder -> quant_conv -> VectorQuantizer indices on real photos."""
    run = _write_run_dir(tmp_path / "run", state)
    flat = tmp_path / "flat"
    flat.mkdir()
    torch.save(lightning_checkpoint(state), flat / "vqgan.ckpt")
    (flat / "vqgan.yaml").write_text(taming_yaml())
    (flat / "other.yaml").write_text(lightning_yaml())
    pth = tmp_path / "pth"
    pth.mkdir()
    torch.save(state, pth / "model.pth")  # top-level state dict
    (pth / "params.yaml").write_text(taming_yaml(bare=True))
    st = tmp_path / "st"
    st.mkdir()
    save_file(state, str(st / "model.safetensors"))
    (st / "config.yaml").write_text(taming_yaml())

    toks = [load_taming(run), load_taming(flat / "vqgan.ckpt"), load_taming(pth), load_taming(st),
            load_taming(run / "ckpts" / "last.ckpt")]
    assert len({t.content_hash for t in toks}) == 1, "same weights must give the same content hash"
    assert toks[0].name == "run" and toks[1].name == "vqgan"

    agree = total = 0
    for imgs in test_images:
        ref = reference_indices(state, TINY_PARAMS, imgs)
        for tok in toks:
            got = tok.encode(imgs)
            assert got.dtype == np.int64 and got.shape == ref.shape == (imgs.shape[0], imgs.shape[1] // 8, imgs.shape[2] // 8)
            agree += int((got == ref).sum())
            total += ref.size
        # not a degenerate model: many distinct codes are used
        assert len(np.unique(ref)) > 50
    rate = agree / total
    print(f"\nindex agreement with taming (Encoder->quant_conv->VectorQuantizer, float32): {agree}/{total} = {rate:.6f}")
    assert rate == 1.0


# Random weights and 16384 codes leave many near-ties, where the kernel path decides the index.
# These seeds each have near-ties that a channels_last input moves (1-4 per config at 256 px).
@pytest.mark.parametrize("attn,ch_mult,seeds", [
    ([], [1, 2, 2, 4], (1, 2)),         # f8, only taming's middle attention block
    ([], [1, 1, 2, 2, 4], (0, 2)),      # f16
    ([16], [1, 2, 2, 4], (0, 2)),       # f8 with an attention level
    ([16], [1, 1, 2, 2, 4], (0, 2)),    # f16 with an attention level
], ids=["f8", "f16", "f8-attn", "f16-attn"])
def test_indices_equal_taming_modules_on_random_weights(attn, ch_mult, seeds):
    """Issue 7: the encoder runs on contiguous NCHW input, as taming does, so every index equals
    taming's own Encoder -> quant_conv -> VectorQuantizer on the same contiguous crops, run one
    crop at a time on one thread (100%, not 99.9%)."""
    params = copy.deepcopy(TINY_PARAMS)
    params["n_embed"] = 16384
    params["ddconfig"].update(attn_resolutions=attn, ch_mult=ch_mult)
    crops = photos((256, 256))[:3]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in seeds:
            sd = make_random_taming_state(params, seed=seed)
            with contextlib.redirect_stdout(io.StringIO()):
                tok = TamingVQTokenizer(params)
            tok.load_state_dict({k: v for k, v in sd.items() if k.startswith(("encoder.", "quant_conv.", "quantize."))})
            ref = np.concatenate([reference_indices(sd, params, crops[i:i + 1]) for i in range(len(crops))])
            got = tok.encode(crops)
            assert tok.describe()["layout"] == "contiguous" and tok.describe()["precision"] == "fp32"
            moved = int((got != ref).sum())
            assert moved == 0, f"seed {seed}: {moved}/{ref.size} indices differ from taming's"
    finally:
        torch.set_num_threads(threads)


def test_torch_tensor_input_and_index_length(tmp_path, state, test_images):
    st = tmp_path / "st"
    st.mkdir()
    save_file(state, str(st / "model.safetensors"))
    (st / "config.yaml").write_text(taming_yaml())
    tok = load_taming(st)
    assert isinstance(tok, VQTokenizer) and isinstance(tok, TamingVQTokenizer)
    imgs = test_images[1][:3]
    np.testing.assert_array_equal(tok.encode(torch.from_numpy(imgs)), tok.encode(imgs))
    assert tok.downsample == 8 and tok.codebook_size == 512
    assert tok.index_length(336, 336) == 1764 and tok.index_length(96, 128) == 12 * 16
    # groups of `encoder_batch` images, the last padded: same indices as one at a time
    five = test_images[1][:5]
    single = tok.encode(five)
    tok.encoder_batch = 3
    np.testing.assert_array_equal(tok.encode(five), single)
    np.testing.assert_array_equal(tok.encode(five[:2]), single[:2])
    tok.encoder_batch = 1
    with pytest.raises(TokenizerError, match="multiple of f=8"):
        tok.encode(np.zeros((1, 60, 64, 3), np.uint8))
    with pytest.raises(TokenizerError, match="uint8"):
        tok.encode(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(TokenizerError, match=r"\(B, H, W, 3\)"):
        tok.encode(np.zeros((64, 64, 3), np.uint8))


def test_chunked_lookup_equals_full_argmin(monkeypatch):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1000, 4, generator=g)
    cb = torch.randn(300, 4, generator=g)
    full = torch.cdist(z.double(), cb.double()).argmin(1)
    monkeypatch.setattr(taming_mod, "LOOKUP_CHUNK_BYTES", 4 * 300 * 7)  # 7 rows per chunk
    got = taming_mod.nearest_code(z, cb)
    assert (got == full).float().mean() >= 0.999


def test_fp16_checkpoint_is_used_as_float32(tmp_path, state, test_images):
    half = {k: v.half() for k, v in state.items()}
    d = tmp_path / "half"
    d.mkdir()
    save_file(half, str(d / "model.safetensors"))
    (d / "config.yaml").write_text(taming_yaml())
    tok = load_taming(d)
    assert all(p.dtype == torch.float32 for p in tok.parameters())
    rounded = {k: v.float() for k, v in half.items()}
    ref = reference_indices(rounded, TINY_PARAMS, test_images[0])
    assert (tok.encode(test_images[0]) == ref).mean() == 1.0
    kept = {k: v for k, v in rounded.items() if k.startswith(("encoder.", "quant_conv.", "quantize."))}
    assert tok.content_hash == taming_mod.hash_state_dict(kept)


def test_gumbel_checkpoint_uses_argmax_of_proj(tmp_path, test_images):
    params = copy.deepcopy(TINY_PARAMS)
    params["embed_dim"] = params["ddconfig"]["z_channels"]
    sd = make_random_taming_state(params, seed=3, gumbel=True)
    d = tmp_path / "gumbel"
    d.mkdir()
    torch.save(lightning_checkpoint(sd), d / "last.ckpt")
    (d / "config.yaml").write_text(taming_yaml(params, target="taming.models.vqgan.GumbelVQ"))
    tok = load_taming(d)
    assert tok.quantizer == "gumbel"
    from taming.modules.diffusionmodules.model import Encoder

    enc = Encoder(**params["ddconfig"]).eval()
    enc.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("encoder.")})
    x = (torch.from_numpy(test_images[0]).permute(0, 3, 1, 2).float() / 127.5 - 1).contiguous()
    with torch.no_grad():
        h = torch.nn.functional.conv2d(enc(x), sd["quant_conv.weight"], sd["quant_conv.bias"])
        ref = torch.nn.functional.conv2d(h, sd["quantize.proj.weight"], sd["quantize.proj.bias"]).argmax(1).numpy()
    assert (tok.encode(test_images[0]) == ref).mean() == 1.0


# ---------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------

def test_pickled_objects_refused_without_trust(tmp_path, state, test_images):
    d = tmp_path / "ns"
    d.mkdir()
    torch.save(lightning_checkpoint(state, {"hyper_parameters": argparse.Namespace(lr=4.5e-6)}), d / "model.ckpt")
    (d / "model.yaml").write_text(taming_yaml())
    with pytest.raises(TokenizerError) as ei:
        load_taming(d)
    msg = str(ei.value)
    assert "cogalign vq convert" in msg and "--trust-pickle" in msg and "model.ckpt" in msg
    assert "\n" not in msg
    with pytest.raises(TokenizerError, match="--trust-pickle"):
        load_tokenizer(str(d))
    tok = load_taming(d, trust_pickle=True)
    ref = reference_indices(state, TINY_PARAMS, test_images[0])
    assert (tok.encode(test_images[0]) == ref).mean() == 1.0


def test_unimportable_pickled_class_loads_with_trust(tmp_path, state):
    """A Lightning checkpoint whose callbacks' classes are not importable here."""
    d = tmp_path / "cb"
    d.mkdir()
    save_with_unimportable_object(lightning_checkpoint(state), d / "last.ckpt")
    (d / "config.yaml").write_text(taming_yaml())
    with pytest.raises(TokenizerError, match="cogalign vq convert"):
        load_taming(d)
    tok = load_taming(d, trust_pickle=True)
    assert tok.codebook_size == 512


def _st_dir(tmp_path, name, sd, yaml_text=None):
    d = tmp_path / name
    d.mkdir(parents=True)
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.yaml").write_text(yaml_text or taming_yaml())
    return d


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path, state):
    sd = dict(state)
    del sd["encoder.conv_out.weight"]
    sd["encoder.extra.weight"] = torch.zeros(3)
    sd["decoder.whatever"] = torch.zeros(3)  # outside the kept namespaces: ignored
    with pytest.raises(TokenizerError) as ei:
        load_taming(_st_dir(tmp_path, "keys", sd))
    msg = str(ei.value)
    assert "missing 1 (encoder.conv_out.weight)" in msg
    assert "unexpected 1 (encoder.extra.weight)" in msg
    assert "decoder.whatever" not in msg

    params = copy.deepcopy(TINY_PARAMS)
    params["n_embed"] = 256
    with pytest.raises(TokenizerError) as ei:
        load_taming(_st_dir(tmp_path, "shape", state, taming_yaml(params)))
    msg = str(ei.value)
    assert "wrong shape 1" in msg and "quantize.embedding.weight [512, 4] vs config [256, 4]" in msg

    params = copy.deepcopy(TINY_PARAMS)
    params["ddconfig"]["ch"] = 64
    with pytest.raises(TokenizerError) as ei:
        load_taming(_st_dir(tmp_path, "wide", state, taming_yaml(params)))
    msg = str(ei.value)
    assert "encoder.conv_in.weight [32, 3, 3, 3] vs config [64, 3, 3, 3]" in msg
    assert "more)" in msg  # long lists are cut, with the count


def test_ambiguous_or_incomplete_folders(tmp_path, state):
    d = tmp_path / "two"
    d.mkdir()
    torch.save(state, d / "a.ckpt")
    save_file(state, str(d / "b.safetensors"))
    (d / "config.yaml").write_text(taming_yaml())
    with pytest.raises(TokenizerError) as ei:
        load_taming(d)
    msg = str(ei.value)
    assert "2 checkpoints found" in msg and "a.ckpt" in msg and "b.safetensors" in msg
    assert load_taming(d / "b.safetensors").codebook_size == 512  # naming one resolves it

    d = tmp_path / "noyaml"
    d.mkdir()
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(TokenizerError, match="no model config found"):
        load_taming(d)

    d = tmp_path / "twoyaml"
    d.mkdir()
    save_file(state, str(d / "model.safetensors"))
    (d / "x.yaml").write_text(taming_yaml())
    (d / "y.yaml").write_text(taming_yaml())
    with pytest.raises(TokenizerError, match="several model configs"):
        load_taming(d)

    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(TokenizerError, match="no checkpoint found"):
        load_taming(d)

    d = tmp_path / "badyaml"
    d.mkdir()
    save_file(state, str(d / "model.safetensors"))
    (d / "config.yaml").write_text("model: {target: x}\n")
    with pytest.raises(TokenizerError, match="no model params"):
        load_taming(d)


def test_truncated_checkpoint_is_a_tokenizer_error(tmp_path, state):
    d = tmp_path / "trunc"
    d.mkdir()
    torch.save(lightning_checkpoint(state), d / "last.ckpt")
    data = (d / "last.ckpt").read_bytes()
    (d / "last.ckpt").write_bytes(data[: len(data) // 2])
    (d / "config.yaml").write_text(taming_yaml())
    with pytest.raises(TokenizerError, match="last.ckpt"):
        load_taming(d)


# ---------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------

def test_presets_and_missing_paths(tmp_path, monkeypatch):
    assert set(list_presets()) >= {"demo", "vqgan-4096"}
    monkeypatch.setenv("COGALIGN_HOME", str(tmp_path / "home"))
    with pytest.raises(TokenizerError) as ei:
        load_tokenizer("vqgan-4096")
    msg = str(ei.value)
    assert "vqgan-4096 is not installed" in msg and "cogalign vq train" in msg and "--vq PATH" in msg
    assert str(tmp_path / "home" / "tokenizers" / "vqgan-4096") in msg
    with pytest.raises(TokenizerError) as ei:
        load_tokenizer(str(tmp_path / "nope"))
    assert "nope" in str(ei.value) and "demo" in str(ei.value) and "vqgan-4096" in str(ei.value)
    assert issubclass(TokenizerError, CogalignError)


def test_vqgan_4096_preset_loads_from_cogalign_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    params = dict(TINY_PARAMS, n_embed=4096)
    _st_dir(home / "tokenizers", "vqgan-4096", make_random_taming_state(params), taming_yaml(params))
    monkeypatch.setenv("COGALIGN_HOME", str(home))
    tok = load_tokenizer("vqgan-4096")
    assert tok.name == "vqgan-4096" and tok.codebook_size == 4096


def test_catalog_names_refuse_another_tokenizer_installed_under_them(tmp_path, monkeypatch, state):
    """issue 15 #7: a 512-code model under ldm-vq-f8's (or vqgan-4096's) name is refused, naming the mismatch."""
    home = tmp_path / "home"
    monkeypatch.setenv("COGALIGN_HOME", str(home))
    for name, words in (("ldm-vq-f8", ["codes 512 (catalog: 16384)"]),
                        ("vqgan-4096", ["codes 512 (catalog: 4096)"]),
                        ("ldm-vq-f4", ["codes 512 (catalog: 8192)", "f 8 (catalog: 4)", "embed_dim 4 (catalog: 3)"])):
        _st_dir(home / "tokenizers", name, state)
        with pytest.raises(TokenizerError) as ei:
            load_tokenizer(name)
        msg = str(ei.value)
        assert f"installed as {name}" in msg and "--vq " in msg
        for w in words:
            assert w in msg


@pytest.fixture(scope="module")
def demo():
    return load_tokenizer("demo")


def test_demo_preset(demo):
    assert demo.name == "demo-f8-4096"
    assert demo.codebook_size == 4096 and demo.downsample == 8
    assert len(demo.content_hash) == 16 and int(demo.content_hash, 16) >= 0
    assert demo.device == torch.device("cpu")
    # the hash is over the weights actually used
    again = load_tokenizer("demo")
    assert again.content_hash == demo.content_hash
    # it pickles (e.g. to be sent to another process) and still encodes the same
    import pickle

    img = photos((64, 64), ["coffee.png"])
    copy_ = pickle.loads(pickle.dumps(demo))
    np.testing.assert_array_equal(copy_.encode(img), demo.encode(img))
    assert copy_.content_hash == demo.content_hash


def test_demo_is_deterministic_and_batch_independent(demo):
    quarters = []
    img = photos((672, 672), ["astronaut.png"])[0]
    for y in (0, 336):
        for x in (0, 336):
            quarters.append(img[y:y + 336, x:x + 336])
    batch = np.stack(quarters)
    a = demo.encode(batch)
    assert a.shape == (4, 42, 42) and a.dtype == np.int64
    assert a.min() >= 0 and a.max() < 4096
    singles = np.concatenate([demo.encode(batch[i:i + 1]) for i in range(4)])
    np.testing.assert_array_equal(a, singles)
    np.testing.assert_array_equal(demo.encode(batch), a)
    assert len(np.unique(a)) > 100  # a trained codebook, not a constant
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):  # the thread count splits reductions differently: it must not show
            torch.set_num_threads(n)
            np.testing.assert_array_equal(demo.encode(batch), a)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads  # encode leaves the caller's setting alone


def test_latent_diffusion_checkpoint_uses_its_first_stage(tmp_path, state, test_images):
    """A latent-diffusion .ckpt holds the VQ model under first_stage_model.*, and its yaml
    under model.params.first_stage_config."""
    import yaml

    sd = {"first_stage_model." + k: v for k, v in state.items()}
    sd["model.diffusion_model.out.0.weight"] = torch.zeros(4)
    d = tmp_path / "ldm"
    d.mkdir()
    torch.save(lightning_checkpoint(sd), d / "model.ckpt")
    cfg = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                     "params": {"unet_config": {"target": "x"},
                                "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface",
                                                       "params": copy.deepcopy(TINY_PARAMS)}}}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    tok = load_taming(d)
    ref = reference_indices(state, TINY_PARAMS, test_images[0])
    assert (tok.encode(test_images[0]) == ref).mean() == 1.0


def test_demo_matches_taming_reference_on_paper_sized_regions(demo):
    """The done-criterion of the core issue: real photos, a taming checkpoint, 672-px quarters.
    The reference runs on one thread: taming's own float32 result moves with the thread count
    (1 vs 2 threads: ~0.15% of positions for this dense 4-dim codebook), ours does not."""
    import yaml
    from safetensors.torch import load_file

    from cogalign.tokenizers.presets import DEMO_DIR

    sd = {k: v.float() for k, v in load_file(DEMO_DIR / "model.safetensors").items()}
    params = yaml.safe_load((DEMO_DIR / "config.yaml").read_text())["model"]["params"]
    img = photos((672, 672), ["coffee.png", "rocket.jpg"])
    quarters = np.stack([im[y:y + 336, x:x + 336] for im in img for y in (0, 336) for x in (0, 336)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = np.concatenate([reference_indices(sd, params, quarters[i:i + 1]) for i in range(len(quarters))])
    finally:
        torch.set_num_threads(threads)
    agreement = (demo.encode(quarters) == ref).mean()
    assert agreement == 1.0, agreement
