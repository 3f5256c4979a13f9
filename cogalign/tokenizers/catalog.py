"""Known tokenizers for `cogalign vq list`: geometry and where each is published.

Sources are named as their authors publish them (checked against the taming-transformers and
latent-diffusion READMEs and the Hub listing of boris/vqgan_f16_16384). Plain-URL downloads are
not fetched by cogalign: put the unpacked files in $COGALIGN_HOME/tokenizers/NAME and use
`--vq NAME` (or pass the folder)."""
from __future__ import annotations

from dataclasses import dataclass


__all__ = ["Known", "KNOWN", "BY_NAME"]


@dataclass(frozen=True)
class Known:
    """One known tokenizer: its geometry (codebook size, factor f, code dimension), how it is
    obtained (`kind`: shipped, local, hub or url), from where (`source`), and which files."""

    name: str
    codes: int
    f: int
    embed_dim: int
    kind: str      # "shipped", "local" (you train it), "hub", "url"
    source: str    # a Hub repo id or a download URL
    files: str     # the files that make the tokenizer, as published
    note: str = ""


_TAMING = "https://heibox.uni-heidelberg.de/d/"
_LDM = "https://ommer-lab.com/files/latent-diffusion/"
_LDM_CFG = "https://github.com/CompVis/latent-diffusion/blob/main/models/first_stage_models/"

KNOWN: tuple[Known, ...] = (
    Known("demo", 4096, 8, 4, "shipped", "cogalign/assets/demo-f8-4096", "model.safetensors, config.yaml",
          "for demos and tests"),
    Known("vqgan-4096", 4096, 8, 4, "local", "$COGALIGN_HOME/tokenizers/vqgan-4096 or $COGALIGN_VQGAN_4096 (Hub repo)",
          "model.safetensors, config.yaml", "the paper's tokenizer: train it (`cogalign vq train`) or name a Hub repo"),
    Known("taming-imagenet-f16-1024", 1024, 16, 256, "url", _TAMING + "8088892a516d4e3baf92/",
          "ckpts/last.ckpt, configs/model.yaml", "taming-transformers README, 'VQGAN ImageNet (f=16), 1024'"),
    Known("taming-imagenet-f16-16384", 16384, 16, 256, "url", _TAMING + "a7530b09fed84f80a887/",
          "ckpts/last.ckpt, configs/model.yaml", "taming-transformers README, 'VQGAN ImageNet (f=16), 16384'"),
    Known("ldm-vq-f4", 8192, 4, 3, "url", _LDM + "vq-f4.zip",
          f"model.ckpt (in the zip), config.yaml ({_LDM_CFG}vq-f4/config.yaml)", "latent-diffusion model zoo"),
    Known("ldm-vq-f8", 16384, 8, 4, "url", _LDM + "vq-f8.zip",
          f"model.ckpt (in the zip), config.yaml ({_LDM_CFG}vq-f8/config.yaml)", "latent-diffusion model zoo"),
    Known("ldm-vq-f8-n256", 256, 8, 4, "url", _LDM + "vq-f8-n256.zip",
          f"model.ckpt (in the zip), config.yaml ({_LDM_CFG}vq-f8-n256/config.yaml)", "latent-diffusion model zoo"),
    Known("ldm-vq-f4-noattn", 8192, 4, 3, "url", "https://heibox.uni-heidelberg.de/f/9c6681f64bb94338a069/?dl=1",
          f"model.ckpt (in the zip), config.yaml ({_LDM_CFG}vq-f4-noattn/config.yaml, attn_type none)",
          "latent-diffusion model zoo, 'f=4, VQ (Z=8192, d=3), no attention'"),
    Known("ldm-vq-f16", 16384, 16, 8, "url", "https://heibox.uni-heidelberg.de/f/0e42b04e2e904890a9b6/?dl=1",
          f"model.ckpt (in the zip), config.yaml ({_LDM_CFG}vq-f16/config.yaml)",
          "latent-diffusion model zoo, 'f=16, VQ (Z=16384, d=8)'"),
    Known("taming-openimages-gumbel-f8", 8192, 8, 256, "url", _TAMING + "2e5662443a6b4307b470/",
          "checkpoints/last.ckpt, configs/model.yaml",
          "taming-transformers README, 'VQGAN OpenImages (f=8), 8192, GumbelQuantization' (vqgan_gumbel_f8); "
          "indices are the argmax of quantize.proj"),
    Known("boris-vqgan-f16-16384", 16384, 16, 256, "hub", "boris/vqgan_f16_16384", "model.ckpt, config.yaml",
          "taming f16-16384 fine-tuned on CC3M + YFCC100M (dalle-mini); a Lightning pickle: "
          "`vq convert --trust-pickle` it or pass --trust-pickle"),
)

#: name -> Known, for `--vq NAME` and `vq list`.
BY_NAME = {k.name: k for k in KNOWN}
