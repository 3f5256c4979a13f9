"""The tokenizer as a pipeline author uses it (issue 17 #8, #10, `decode`): nn.Module idioms
(.to, .half, .bfloat16, .float, .cpu, .cuda) keep the device and the encoder mode in step or
refuse in one line; bad pixel batches are refused with the actual problem and a conversion
that works as written; `decode` reads the decoder half lazily from the tokenizer's checkpoint."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cogalign.tokenizers import TamingVQTokenizer, TokenizerError, load_taming, load_tokenizer
from tokenizer_fixtures import TINY_PARAMS, make_random_taming_state, photos, taming_yaml

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def crops():
    return photos((64, 64))[:4]


@pytest.fixture(scope="module")
def reference(crops):
    """fp32 and bf16 indices of the demo tokenizer, made with set_encoder_mode."""
    tok = load_tokenizer("demo")
    fp32 = tok.encode(crops)
    tok.set_encoder_mode("bf16")
    bf16 = tok.encode(crops)
    assert (fp32 != bf16).any()  # bf16 really moves some indices, so the comparisons below mean something
    return {"fp32": fp32, "bf16": bf16, "hash": tok.content_hash}


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------
# 8. nn.Module idioms
# ---------------------------------------------------------------------------------------

def test_dtype_idioms_set_the_encoder_precision(crops, reference):
    tok = load_tokenizer("demo")
    for to_bf16 in (lambda t: t.to(torch.bfloat16), lambda t: t.bfloat16(), lambda t: t.to("cpu", torch.bfloat16)):
        assert to_bf16(tok) is tok
        # the same indices as the bf16 encoder mode, and provenance says so
        np.testing.assert_array_equal(tok.encode(crops), reference["bf16"])
        assert tok.describe()["precision"] == "bf16" and tok.encoder_mode()["precision"] == "bf16"
        assert tok.encoder.conv_in.weight.dtype == torch.float32  # autocast dtype, not the weights
        assert tok.content_hash == reference["hash"]
        tok.cpu()  # a device move keeps the precision
        assert tok.precision == "bf16" and tok.device == torch.device("cpu")
        # batch-invariant in this mode too
        np.testing.assert_array_equal(np.concatenate([tok.encode(crops[i:i + 1]) for i in range(len(crops))]),
                                      reference["bf16"])
        for back in (lambda t: t.float(), lambda t: t.to(torch.float32)):
            tok.bfloat16()
            back(tok)
            assert tok.describe()["precision"] == "fp32"
            np.testing.assert_array_equal(tok.encode(crops), reference["fp32"])


def test_memory_format_idiom_sets_the_layout(crops, reference):
    tok = load_tokenizer("demo")
    tok.to(memory_format=torch.channels_last)
    assert tok.describe()["layout"] == "channels_last" and tok.precision == "fp32"
    assert tok.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    tok.to(memory_format=torch.contiguous_format)
    assert tok.describe()["layout"] == "contiguous" and tok.encoder.conv_in.weight.is_contiguous()
    np.testing.assert_array_equal(tok.encode(crops), reference["fp32"])


@pytest.mark.parametrize("idiom, words", [
    (lambda t: t.half(), ["float16", "CPU", "bfloat16"]),
    (lambda t: t.to(torch.float16), ["float16", "CPU", "bfloat16"]),
    (lambda t: t.to("meta"), ["meta device", "cpu or cuda"]),
    (lambda t: t.double(), ["float64", "not an encoder precision", "bfloat16"]),
    (lambda t: t.to(torch.int8), ["torch.int8", "bfloat16"]),
    (lambda t: t.to_empty(device="cpu"), ["to_empty", "uninitialized", "tok.to(device)"]),
], ids=["half", "to-float16", "to-meta", "double", "to-int8", "to-empty"])
def test_refused_idioms_leave_the_tokenizer_as_it_was(crops, reference, idiom, words):
    tok = load_tokenizer("demo")
    tok.bfloat16()
    with pytest.raises(TokenizerError) as ei:
        idiom(tok)
    msg = _one_line(ei)
    assert all(w in msg for w in words), msg
    assert tok.precision == "bf16" and tok.device.type == "cpu"
    assert {p.device.type for p in tok.parameters()} == {"cpu"}
    assert {p.dtype for p in tok.parameters()} == {torch.float32}
    np.testing.assert_array_equal(tok.encode(crops), reference["bf16"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")
def test_cuda_where_there_is_none_is_one_line_and_changes_nothing(crops, reference):
    tok = load_tokenizer("demo")
    for idiom in (lambda t: t.to("cuda"), lambda t: t.cuda(), lambda t: t.to_device("cuda")):
        with pytest.raises(TokenizerError) as ei:
            idiom(tok)
        assert "cuda" in _one_line(ei).lower()
        assert tok.device.type == "cpu" and tok.encoder_batch == 1
    assert tok.to_device("auto").device == torch.device("cpu")
    np.testing.assert_array_equal(tok.encode(crops), reference["fp32"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_to_cuda_moves_the_device_with_the_weights(crops, reference):
    tok = load_tokenizer("demo")
    tok.to("cuda")
    assert tok.device.type == "cuda" and tok.encoder_batch == 8
    assert {p.device.type for p in tok.parameters()} == {"cuda"}
    got = tok.encode(crops)
    assert (got == reference["fp32"]).mean() > 0.99  # other kernels: a few near-ties may move
    np.testing.assert_array_equal(np.concatenate([tok.encode(crops[i:i + 1]) for i in range(len(crops))]), got)
    tok.half()
    assert tok.precision == "fp16" and tok.encoder.conv_in.weight.dtype == torch.float32
    assert tok.decode(got).shape == crops.shape
    with pytest.raises(TokenizerError, match="float16 is refused on the CPU"):
        tok.cpu()  # fp16 would follow it to the CPU: refused, nothing moved
    assert tok.device.type == "cuda"
    tok.float().cpu()
    assert tok.device.type == "cpu" and tok.encoder_batch == 1 and tok.precision == "fp32"
    np.testing.assert_array_equal(tok.encode(crops), reference["fp32"])


# ---------------------------------------------------------------------------------------
# 10. Errors that name the actual problem, with a conversion that works as written
# ---------------------------------------------------------------------------------------

_RNG = np.random.default_rng(0)
_X = _RNG.integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
_GREY = _X[..., 0]
_GREY_RGB = np.repeat(_GREY[..., None], 3, axis=-1)

# (case, input, words the message must hold, the uint8 batch the suggested conversion must give)
BAD_BATCHES = [
    ("rgba", np.concatenate([_X, np.full(_X.shape[:3] + (1,), 255, np.uint8)], axis=-1), ["4 channels", "alpha"], _X),
    ("grey (B, H, W)", _GREY, ["grey", "RGB"], _GREY_RGB),
    ("grey (B, H, W, 1)", _GREY[..., None], ["1 channel", "grey"], _GREY_RGB),
    ("float CHW 0..1", _X.transpose(0, 3, 1, 2).astype(np.float32) / 255, ["channels first", "[0, 1]", "255"], _X),
    ("float -1..1", _X.astype(np.float32) / 127.5 - 1, ["[-1, 1]"], _X),
    ("float 0..255", _X.astype(np.float64), ["already 0..255"], _X),
    ("one image", _X[0], ["one image", "batch axis"], _X[:1]),
    ("one CHW image", _X[0].transpose(2, 0, 1), ["channels-first", "batch axis"], _X[:1]),
    ("int64", _X.astype(np.int64), ["0..255", "int64"], _X),
    ("uint16", _X.astype(np.uint16) * 257, ["16-bit"], _X),
    ("torch float CHW 0..1", torch.from_numpy(_X).permute(0, 3, 1, 2).float() / 255, ["channels first", "[0, 1]"], _X),
    ("torch grey", torch.from_numpy(_GREY), ["grey"], _GREY_RGB),
]


@pytest.fixture(scope="module")
def tiny():
    return TamingVQTokenizer(TINY_PARAMS, name="tiny")


@pytest.mark.parametrize("case, x, words, want", BAD_BATCHES, ids=[c[0] for c in BAD_BATCHES])
def test_encode_errors_name_the_problem_and_a_working_fix(tiny, case, x, words, want):
    with pytest.raises(TokenizerError) as ei:
        tiny.encode(x)
    msg = _one_line(ei)
    assert all(w in msg for w in words), msg
    assert "stack RGB images into a batch" not in msg
    fix = msg.rsplit("convert with ", 1)[1]
    fixed = eval(fix, {"np": np, "torch": torch, "x": x})  # noqa: S307 - the message's own expression
    got = fixed.numpy() if isinstance(fixed, torch.Tensor) else fixed
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(tiny.encode(fixed), tiny.encode(want))


def test_encode_refuses_other_objects_and_sizes_in_one_line(tiny):
    from PIL import Image

    with pytest.raises(TokenizerError, match=r"got Image; convert with np.asarray\(image.convert\('RGB'\)\)\[None\]"):
        tiny.encode(Image.fromarray(_X[0]))
    with pytest.raises(TokenizerError, match=r"got list; convert with np.stack\(images\)"):
        tiny.encode(list(_X))
    with pytest.raises(TokenizerError, match="not a positive multiple of f=8"):
        tiny.encode(_X[:, :12])


# ---------------------------------------------------------------------------------------
# decode on the tokenizer
# ---------------------------------------------------------------------------------------

def _psnr(a: np.ndarray, b: np.ndarray, axis=None) -> np.ndarray:
    return 10 * np.log10(255 ** 2 / np.mean((a.astype(float) - b.astype(float)) ** 2, axis=axis))


def test_decode_round_trip_is_the_image_not_noise():
    tok = load_tokenizer("demo")
    x = photos((96, 96))  # the 13 example photos
    idx = tok.encode(x)
    assert "_decoder" not in tok.__dict__  # loaded on the first decode, not before
    rec = tok.decode(idx)
    assert rec.shape == x.shape and rec.dtype == np.uint8
    noise = tok.decode(np.random.default_rng(0).integers(0, tok.codebook_size, idx.shape))
    got, baseline = _psnr(rec, x), _psnr(noise, x)
    print(f"\ndemo round trip, 13 photos 96x96: {got:.1f} dB; random indices: {baseline:.1f} dB")
    assert got > baseline + 6, (got, baseline)  # at least 4x less squared error than random codes
    per_image = _psnr(rec, x, axis=(1, 2, 3)) - _psnr(noise, x, axis=(1, 2, 3))
    assert (per_image > 3).all(), per_image  # and at least 2x less on every photo
    np.testing.assert_array_equal(tok.decode(idx[1]), rec[1])  # one grid, batch-independent
    assert not any(k.startswith(("decoder.", "post_quant_conv.")) for k in tok.state_dict())
    # the decoder stays float32 whatever the encoder precision; a pickled tokenizer reloads it
    tok.bfloat16()
    np.testing.assert_array_equal(tok.decode(idx), rec)
    clone = pickle.loads(pickle.dumps(tok))
    assert "_decoder" not in clone.__dict__
    np.testing.assert_array_equal(clone.decode(idx), rec)
    with pytest.raises(TokenizerError, match="decode expects integer code indices, got float64"):
        tok.decode(idx.astype(np.float64) + 0.7)  # was truncated to other codes without a word
    np.testing.assert_array_equal(tok.decode(torch.from_numpy(idx[1]).to(torch.int32)), rec[1])


def test_decode_without_decoder_weights_says_so_and_how_to_get_them(tmp_path):
    sd = make_random_taming_state(TINY_PARAMS, seed=0)
    encoder_only = {k: v for k, v in sd.items() if not k.startswith(("decoder.", "post_quant_conv.", "loss."))}
    save_file(encoder_only, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.yaml").write_text(taming_yaml())
    tok = load_taming(tmp_path)
    idx = tok.encode(photos((32, 32))[:1])  # it encodes
    with pytest.raises(TokenizerError) as ei:
        tok.decode(idx)
    msg = _one_line(ei)
    assert "encoder-only" in msg and "full checkpoint" in msg and "model.safetensors" in msg
    with pytest.raises(TokenizerError) as ei:
        TamingVQTokenizer(TINY_PARAMS, name="tiny").decode(idx)
    assert "load_tokenizer" in _one_line(ei)


def test_readme_python_snippet_runs_as_written(monkeypatch, capsys):
    import re

    from helpers import REPO

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### A tokenizer from Python"):readme.index("### Training a tokenizer")]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert capsys.readouterr().out.strip() == "bf16"
    assert namespace["indices"].shape == (1, 16, 16) and namespace["rgb"].shape == (1, 128, 128, 3)
    assert namespace["tok"].encoder_mode()["precision"] == "bf16"


def test_an_empty_spec_is_refused_not_the_working_folder(tmp_path, monkeypatch):
    """`load_tokenizer("")` / `--vq ""` loaded whatever checkpoint the working folder held, named ''."""
    import shutil

    from cogalign.tokenizers.presets import DEMO_DIR

    for f in ("model.safetensors", "config.yaml"):
        shutil.copy(DEMO_DIR / f, tmp_path / f)
    monkeypatch.chdir(tmp_path)
    for spec in ("", "  "):
        with pytest.raises(TokenizerError) as ei:
            load_tokenizer(spec)
        assert "spec is empty" in _one_line(ei) and "vq list" in str(ei.value)
    assert load_tokenizer(".").content_hash == load_tokenizer("demo").content_hash  # `.` says it on purpose


def test_decode_refuses_a_checkpoint_replaced_since_load(tmp_path):
    """decode reads the decoder lazily from the tokenizer's file: replaced in between (`vq train --force`
    or `--resume` into the same folder, a pickled tokenizer reloaded later), it decoded the indices
    with another model's decoder and codebook, silently."""
    (tmp_path / "config.yaml").write_text(taming_yaml())
    save_file(make_random_taming_state(TINY_PARAMS, seed=0), str(tmp_path / "model.safetensors"))
    tok = load_taming(tmp_path)
    idx = tok.encode(photos((32, 32))[:1])
    clone = pickle.dumps(tok)
    save_file(make_random_taming_state(TINY_PARAMS, seed=1), str(tmp_path / "model.safetensors"))
    for t in (tok, pickle.loads(clone)):
        with pytest.raises(TokenizerError) as ei:
            t.decode(idx)
        msg = _one_line(ei)
        assert "changed since tokenizer" in msg and tok.content_hash in msg and "load the tokenizer again" in msg
    fresh = load_taming(tmp_path)
    assert fresh.decode(fresh.encode(photos((32, 32))[:1])).shape == (1, 32, 32, 3)
