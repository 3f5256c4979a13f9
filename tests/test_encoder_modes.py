"""Encoder modes (issue 10 part 3): --precision fp32|bf16|fp16, --channels-last, --compile.
The default (fp32, contiguous, eager) is unchanged; other modes run (or are refused with one
line), stay batch- and thread-invariant, and are recorded in each record and the manifest."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cogalign.errors import CogalignError
from cogalign.options import ExpandOptions
from cogalign.errors import OptionError
from cogalign.targets.render import parse_vq
from cogalign.tokenizers import TokenizerError, load_tokenizer
from cogalign.expand.writer import read_shard
from helpers import EXAMPLES, FAST, run_cli
from tokenizer_fixtures import photos


@pytest.fixture(scope="module")
def crops():
    return photos((128, 128))[:6]


@pytest.fixture(scope="module")
def fp32_indices(crops):
    return load_tokenizer("demo").encode(crops)


def test_bf16_runs_on_the_cpu_and_fp32_is_unchanged(crops, fp32_indices):
    tok = load_tokenizer("demo")
    assert tok.describe()["precision"] == "fp32" and tok.describe()["layout"] == "contiguous"
    tok.set_encoder_mode(precision="bf16")
    bf16 = tok.encode(crops)
    assert bf16.shape == fp32_indices.shape and bf16.dtype == np.int64
    assert bf16.min() >= 0 and bf16.max() < tok.codebook_size
    agree = (bf16 == fp32_indices).mean()
    print(f"\nbf16 vs fp32 (demo, 6 crops of 128 px): {agree:.4f} of indices equal")
    assert 0.2 < agree < 1.0  # bf16 really runs (it moves indices), and it is the same model
    assert tok.describe()["precision"] == "bf16"
    # batch- and thread-invariant in bf16 too
    np.testing.assert_array_equal(np.concatenate([tok.encode(crops[i:i + 1]) for i in range(len(crops))]), bf16)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            np.testing.assert_array_equal(tok.encode(crops), bf16)
    finally:
        torch.set_num_threads(threads)
    tok.set_encoder_mode()  # back to the default: exactly the fp32 indices
    np.testing.assert_array_equal(tok.encode(crops), fp32_indices)


def test_channels_last_is_opt_in_and_recorded(crops, fp32_indices):
    tok = load_tokenizer("demo")
    tok.set_encoder_mode(channels_last=True)
    assert tok.describe()["layout"] == "channels_last"
    assert tok.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    got = tok.encode(crops)
    assert (got == fp32_indices).mean() > 0.99
    np.testing.assert_array_equal(np.concatenate([tok.encode(crops[i:i + 1]) for i in range(len(crops))]), got)
    tok.set_encoder_mode()
    assert tok.encoder.conv_in.weight.is_contiguous()
    np.testing.assert_array_equal(tok.encode(crops), fp32_indices)


def test_fp16_is_refused_on_the_cpu_and_bad_names_are_refused():
    tok = load_tokenizer("demo")
    with pytest.raises(TokenizerError) as ei:
        tok.set_encoder_mode(precision="fp16")
    msg = str(ei.value)
    assert "--precision fp16" in msg and "CPU" in msg and "bf16" in msg and "\n" not in msg
    assert tok.precision == "fp32"  # unchanged
    with pytest.raises(TokenizerError, match="choose from fp32, bf16, fp16"):
        tok.set_encoder_mode(precision="int8")
    with pytest.raises(OptionError, match="vq_precision='half': choose from fp32, bf16, fp16"):
        ExpandOptions(vq_precision="half")


def test_precision_and_layout_enter_the_fingerprint():
    base = ExpandOptions()
    assert len({base.fingerprint(), base.replace(vq_precision="bf16").fingerprint(),
                base.replace(vq_channels_last=True).fingerprint(),
                base.replace(vq_compile=True).fingerprint()}) == 4


def _records(out):
    return [r for f in sorted((out / "data").iterdir()) for r in read_shard(f)]


def test_expand_records_the_encoder_mode(tmp_path):
    fp32_out, bf16_out = tmp_path / "fp32", tmp_path / "bf16"
    args = [*FAST, "--workers", "0", "--targets", "vq", "--device", "cpu"]
    run_cli("expand", EXAMPLES, "--out", fp32_out, *args)
    run_cli("expand", EXAMPLES, "--out", bf16_out, *args, "--precision", "bf16", "--channels-last")
    fp32, bf16 = _records(fp32_out), _records(bf16_out)
    with_image = [r for r in fp32 if "image" in r]
    assert with_image
    for r in with_image:
        assert r["cogalign"]["vq_encoder"] == {"precision": "fp32", "layout": "contiguous", "compile": False}
    for r in (r for r in bf16 if "image" in r):
        assert r["cogalign"]["vq_encoder"] == {"precision": "bf16", "layout": "channels_last", "compile": False}
    manifest = json.loads((bf16_out / "cogalign.json").read_text())
    assert manifest["options"]["vq_precision"] == "bf16" and manifest["options"]["vq_channels_last"] is True
    report = json.loads((bf16_out / "report.json").read_text())
    assert report["options"]["vq_precision"] == "bf16"
    # the bf16 run really encoded in bf16: some VQ answers differ from fp32's
    def vq_answers(records):
        return [t["value"] for r in records for t in r["conversations"] if t["value"].startswith("<vq start>")]
    a, b = vq_answers(fp32), vq_answers(bf16)
    assert len(a) == len(b) == len(with_image) and a != b
    assert all(len(parse_vq(x)) == len(parse_vq(y)) for x, y in zip(a, b))
    # resuming the bf16 output with fp32 is refused, with the --overwrite hint
    result = run_cli("expand", EXAMPLES, "--out", bf16_out, *args, expect=2)
    assert "--overwrite" in result.output


def test_expand_fp16_on_the_cpu_is_one_line(tmp_path):
    result = run_cli("expand", EXAMPLES, "--out", tmp_path / "o", *FAST, "--workers", "0", "--device", "cpu",
                     "--precision", "fp16", expect=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--precision fp16 is refused on the CPU" in lines[0]
    result = run_cli("expand", EXAMPLES, "--out", tmp_path / "p", *FAST, "--precision", "fp64", expect=2)
    assert "--precision 'fp64': choose from fp32, bf16, fp16" in result.output
    assert issubclass(TokenizerError, CogalignError)


def test_compile_hides_the_no_cuda_runtime_notice(monkeypatch):
    """issue 15 #17: inductor imports torch.utils.cpp_extension, whose logger says "No CUDA runtime
    is found" on a CPU machine with a CUDA_HOME; --compile is not about CUDA, so that line is gone."""
    import logging

    tok = load_tokenizer("demo")
    logger = logging.getLogger("torch.utils.cpp_extension")
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setattr("torch.compile", lambda fn, **kw: fn)  # what matters happens before compiling
    tok.set_encoder_mode("fp32", compile=True)
    tok._encoder_fn()
    assert not logger.isEnabledFor(logging.WARNING)
