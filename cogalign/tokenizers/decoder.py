"""The decoder half of a taming VQGAN: code indices -> codebook vectors -> post_quant_conv ->
taming `Decoder` -> uint8 RGB. Used to show what VQ targets mean (`cogalign show`, `vq recon`).

Built from `taming.modules` only; the weights come from the same checkpoint as the encoder
(decoder.*, post_quant_conv.*, quantize.embedding.weight), read without unpickling."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from taming.modules.diffusionmodules.model import Decoder

from cogalign.tokenizers.base import TokenizerError
from cogalign.tokenizers.checkpoints import (DECODER_PREFIXES, apply_attn_type, find_checkpoint, hash_state_dict, normalize_params,
                                             quantizer_kind, read_config, read_state_dict, select_model_keys,
                                             strip_prefix)


__all__ = ["VQDecoder", "load_decoder", "decoder_from_files"]


class VQDecoder(nn.Module):
    """indices (B, h, w) or (h, w) -> RGB uint8 (B, h*f, w*f, 3) or (h*f, w*f, 3); each grid is decoded
    on its own, so its pixels do not depend on the batch."""

    def __init__(self, params: dict, name: str = "taming"):
        super().__init__()
        params = normalize_params(params, source=name)
        dd = params["ddconfig"]
        self.name = name
        self.codebook_size = int(params["n_embed"])
        self.embed_dim = int(params["embed_dim"])
        self.downsample = 2 ** (len(dd["ch_mult"]) - 1)
        with contextlib.redirect_stdout(io.StringIO()):  # taming prints the z shape
            self.decoder = apply_attn_type(Decoder(**dd), dd)
        self.post_quant_conv = nn.Conv2d(self.embed_dim, int(dd["z_channels"]), 1)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(self.codebook_size, self.embed_dim)
        self.content_hash = ""
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True):  # always in eval mode
        """A decoder is always in eval mode: `train()` leaves it there and returns it."""
        return nn.Module.train(self, False)

    @torch.inference_mode()
    def decode(self, indices: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, h, w) or (h, w) code indices -> (B, h*f, w*f, 3) or (h*f, w*f, 3) uint8 RGB, on the
        device of the weights (the result is a CPU array). An index outside the codebook or a
        grid of another shape raises TokenizerError in one line."""
        raw = indices.cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
        if raw.dtype.kind not in "iu":  # floats would be truncated to other codes without a word
            raise TokenizerError(f"{self.name}: decode expects integer code indices, got {raw.dtype}; "
                                 "pass what encode returned (int64), or parse_vq(text) for a VQ answer")
        idx = torch.as_tensor(raw, dtype=torch.int64)
        single = idx.ndim == 2
        if single:
            idx = idx[None]
        if idx.ndim != 3 or 0 in idx.shape:
            raise TokenizerError(f"{self.name}: decode expects an index grid (h, w) or (B, h, w), got {tuple(idx.shape)}")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.codebook_size:
            raise TokenizerError(f"{self.name}: index {hi if hi >= self.codebook_size else lo} is outside the "
                                 f"codebook (0..{self.codebook_size - 1}); were these indices made by another tokenizer?")
        # one grid at a time: convolution kernels depend on the batch size, and a grid must
        # decode to the same pixels whatever it is batched with
        out = np.stack([self._decode_one(g) for g in idx])
        return out[0] if single else out

    def _decode_one(self, grid: torch.Tensor) -> np.ndarray:
        weight = self.quantize.embedding.weight
        q = weight[grid[None].to(weight.device)].permute(0, 3, 1, 2).contiguous()
        x = self.decoder(self.post_quant_conv(q))
        return ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def load_decoder(path: str | Path, trust_pickle: bool = False, name: str | None = None) -> VQDecoder:
    """The decoder of a taming checkpoint folder or file (layouts as `find_checkpoint`)."""
    path = Path(path).expanduser()
    ckpt, cfg = find_checkpoint(path)
    return decoder_from_files(ckpt, cfg, trust_pickle=trust_pickle, name=name or (path.name if path.is_dir() else ckpt.stem))


def decoder_from_files(ckpt: Path, cfg: Path, trust_pickle: bool = False, name: str | None = None,
                       encoder_hash: str | None = None) -> VQDecoder:
    """The decoder of checkpoint file `ckpt` with its model yaml `cfg` (what `load_taming` found),
    float32 on the CPU. Refuses a Gumbel model and a checkpoint without decoder.* weights, and, given
    `encoder_hash` (the tokenizer's content_hash), a file whose encoder path is no longer that one."""
    params, target = read_config(cfg)
    raw = strip_prefix(read_state_dict(ckpt, trust_pickle=trust_pickle))
    name = name or ckpt.stem
    if encoder_hash:
        now = hash_state_dict({k: v.float() for k, v in select_model_keys(raw).items()})
        if now != encoder_hash:
            raise TokenizerError(f"{ckpt}: changed since tokenizer {name} was loaded (encoder hash {now}, not "
                                 f"{encoder_hash}), so its decoder would not match the indices; load the tokenizer again")
    if quantizer_kind(target, set(raw)) == "gumbel":
        raise TokenizerError(f"{ckpt}: a Gumbel VQGAN; decoding its indices is not supported (use a VQ model)")
    sd = {k: v.float() for k, v in raw.items() if k.startswith(DECODER_PREFIXES) or k == "quantize.embedding.weight"}
    if not any(k.startswith("decoder.") for k in sd):
        raise TokenizerError(f"{ckpt}: holds no decoder.* weights (an encoder-only export), so it encodes but cannot "
                             "decode; use the full checkpoint it came from (vq train writes the decoder; vq convert "
                             "keeps decoder.* and post_quant_conv.* when its source has them)")
    model = VQDecoder(params, name=name)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        bad = (missing or unexpected)[:5]
        raise TokenizerError(f"{ckpt}: decoder weights do not match {cfg} ({len(missing)} missing, "
                             f"{len(unexpected)} unexpected, e.g. {', '.join(bad)}); check that this yaml belongs to it")
    model.content_hash = hash_state_dict(sd)
    return model
