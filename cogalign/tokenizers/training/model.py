"""The trained model: taming's Encoder / Decoder with quant_conv / post_quant_conv around
vector-quantize-pytorch's `VectorQuantize`, and the architecture presets."""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from cogalign.tokenizers.base import TokenizerError


@dataclass(frozen=True)
class Preset:
    """An architecture plus the loss settings it is trained with."""
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    embed_dim: int
    attn_resolutions: tuple[int, ...]
    codes: int
    disc_weight: float  # 0: no discriminator
    perceptual_weight: float  # 0: no LPIPS
    mse_weight: float  # extra MSE term (the demo recipe); taming uses L1 only
    disc_layers: int = 3
    disc_start: int = 0
    lr: float | None = None  # None: taming's 4.5e-6 x batch size x ranks
    betas: tuple[float, float] = (0.5, 0.9)
    warmup: int = 0
    notes: str = field(default="", compare=False)


PRESETS: dict[str, Preset] = {
    # The shipped demo's shape and recipe: small, reconstruction + commitment only.
    "demo": Preset(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=4, embed_dim=4,
                   attn_resolutions=(), codes=4096, disc_weight=0.0, perceptual_weight=0.0,
                   mse_weight=1.0, lr=1e-3, betas=(0.9, 0.99), warmup=100,
                   notes="small f8, L1 + MSE + commitment, no GAN"),
    # latent-diffusion vq-f8 with 4096 codes: architecture and loss as in CompVis/latent-diffusion
    # models/first_stage_models/vq-f8/config.yaml (lossconfig VQLPIPSWithDiscriminator:
    # disc_conditional false, disc_in_channels 3, disc_num_layers 2, disc_start 1,
    # disc_weight 0.6, codebook_weight 1.0; base_learning_rate 4.5e-6).
    "vqgan-4096": Preset(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, z_channels=4, embed_dim=4,
                         attn_resolutions=(32,), codes=4096, disc_weight=0.6, perceptual_weight=1.0,
                         mse_weight=0.0, disc_layers=2, disc_start=1,
                         notes="latent-diffusion vq-f8, L1 + LPIPS + PatchGAN hinge + commitment"),
    # taming ImageNet f16-16384 shape and loss settings.
    "vqgan-f16-16384": Preset(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256,
                              embed_dim=256, attn_resolutions=(16,), codes=16384, disc_weight=0.8,
                              perceptual_weight=1.0, mse_weight=0.0, disc_layers=3, disc_start=250001,
                              notes="taming ImageNet f16, L1 + LPIPS + PatchGAN hinge + commitment"),
}


def make_ddconfig(ch: int = 32, ch_mult: Sequence[int] = (1, 2, 2, 4), num_res_blocks: int = 1,
                  z_channels: int = 4, attn_resolutions: Sequence[int] = (), resolution: int = 256) -> dict:
    if ch < 32 or ch % 32:
        raise TokenizerError(f"--ch {ch}: must be a positive multiple of 32 (taming uses GroupNorm with 32 groups)")
    if not ch_mult or any(m < 1 for m in ch_mult):
        raise TokenizerError(f"--ch-mult {list(ch_mult)}: give one or more positive multipliers, e.g. 1,2,2,4")
    for name, v in (("--res-blocks", num_res_blocks), ("--z-channels", z_channels)):
        if v < 1:
            raise TokenizerError(f"{name} {v}: must be at least 1")
    return {
        "double_z": False, "z_channels": int(z_channels), "resolution": int(resolution),
        "in_channels": 3, "out_ch": 3, "ch": int(ch), "ch_mult": [int(m) for m in ch_mult],
        "num_res_blocks": int(num_res_blocks), "attn_resolutions": [int(r) for r in attn_resolutions],
        "dropout": 0.0,
    }


class VQAutoencoder(nn.Module):
    """taming Encoder -> quant_conv -> VectorQuantize -> post_quant_conv -> taming Decoder.

    The quantizer is EMA (k-means init, dead-code replacement, Euclidean distance) and
    always runs in float32, also under autocast. Its codebook is synchronised across
    ranks by the training loop (`sync_codebook=False`, `sync_kmeans=False` here: the
    library's own sync can hang when ranks take different paths)."""

    def __init__(self, ddconfig: dict, codes: int, embed_dim: int, decay: float = 0.99,
                 dead_code_threshold: float = 2.0, commitment_weight: float = 0.25):
        super().__init__()
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from vector_quantize_pytorch import VectorQuantize

        if codes < 2:
            raise TokenizerError(f"--codes {codes}: a codebook needs at least 2 codes")
        if embed_dim < 1:
            raise TokenizerError(f"--embed-dim {embed_dim}: must be at least 1")
        self.ddconfig = dict(ddconfig)
        self.codes = int(codes)
        self.embed_dim = int(embed_dim)
        z = ddconfig["z_channels"]
        with contextlib.redirect_stdout(io.StringIO()):  # taming's Decoder prints its z shape
            self.encoder = Encoder(**ddconfig)
            self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(z, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        self.vq = VectorQuantize(
            dim=embed_dim, codebook_size=codes, decay=decay, kmeans_init=True,
            threshold_ema_dead_code=dead_code_threshold, use_cosine_sim=False,
            accept_image_fmap=True, commitment_weight=commitment_weight,
            sync_codebook=False, sync_kmeans=False)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    @property
    def codebook(self) -> torch.Tensor:
        """(codes, embed_dim) float32: the VectorQuantize codebook `_codebook.embed[0]`."""
        return self.vq._codebook.embed[0]

    def codebook_buffers(self) -> list[torch.Tensor]:
        cb = self.vq._codebook
        return [cb.embed, cb.embed_avg, cb.cluster_size, cb.initted]

    def pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def quantize(self, h: torch.Tensor):
        with torch.autocast(h.device.type, enabled=False):
            return self.vq(h.float())

    def encode(self, x: torch.Tensor):
        return self.quantize(self.pre_quant(x))

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(q))

    def forward(self, x: torch.Tensor):
        q, idx, vq_loss = self.encode(x)
        return self.decode(q), idx, vq_loss

    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight
