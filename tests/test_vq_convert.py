"""`vq convert` checks the decoder (decoder.* and post_quant_conv.*) against the yaml, as its help
says (issue 7 item 12): a checkpoint with a broken decoder is refused, one without a decoder
converts and says so."""
from __future__ import annotations

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cogalign.cli.vq import vq_app
from tokenizer_fixtures import TINY_PARAMS, lightning_checkpoint, make_random_taming_state, taming_yaml


def _convert(tmp_path, sd, name):
    src = tmp_path / name
    src.mkdir()
    torch.save(lightning_checkpoint(sd), src / "last.ckpt")
    (src / "config.yaml").write_text(taming_yaml())
    dst = tmp_path / "out" / f"{name}.safetensors"
    result = CliRunner().invoke(vq_app, ["convert", str(src / "last.ckpt"), str(dst)])
    return result, dst


def test_convert_refuses_a_decoder_that_does_not_match_the_yaml(tmp_path):
    full = make_random_taming_state(TINY_PARAMS, seed=0)

    sd = dict(full)
    del sd["decoder.conv_out.bias"]
    r, dst = _convert(tmp_path, sd, "nobias")
    assert r.exit_code == 2, r.output
    assert "decoder weights do not match" in r.output and "missing 1 (decoder.conv_out.bias)" in r.output
    assert "config.yaml" in r.output and "\n" not in r.output.strip()
    assert not dst.exists()

    sd = dict(full)
    sd["post_quant_conv.weight"] = torch.zeros(8, 4, 1, 1)
    sd["decoder.extra.weight"] = torch.zeros(2)
    r, dst = _convert(tmp_path, sd, "shape")
    assert r.exit_code == 2, r.output
    assert "post_quant_conv.weight [8, 4, 1, 1] vs config [4, 4, 1, 1]" in r.output
    assert "unexpected 1 (decoder.extra.weight)" in r.output
    assert not dst.exists()

    # a decoder without its post_quant_conv is just as unusable
    sd = {k: v for k, v in full.items() if not k.startswith("post_quant_conv.")}
    r, dst = _convert(tmp_path, sd, "nopqc")
    assert r.exit_code == 2 and "missing 2 (post_quant_conv.bias, post_quant_conv.weight)" in r.output


def test_convert_with_and_without_a_decoder(tmp_path):
    full = make_random_taming_state(TINY_PARAMS, seed=0)
    r, dst = _convert(tmp_path, full, "full")
    assert r.exit_code == 0, r.output
    assert "decoder: present, checked against the yaml" in r.output
    keys = set(load_file(str(dst)))
    assert {"decoder.conv_out.bias", "post_quant_conv.weight"} <= keys

    encoder_only = {k: v for k, v in full.items() if not k.startswith(("decoder.", "post_quant_conv."))}
    r, dst = _convert(tmp_path, encoder_only, "enc")
    assert r.exit_code == 0, r.output
    assert "decoder: none in this checkpoint" in r.output and "cannot report PSNR" in r.output
    assert not any(k.startswith("decoder.") for k in load_file(str(dst)))
