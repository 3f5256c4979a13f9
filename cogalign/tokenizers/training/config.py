"""`vq train` settings: a preset's architecture and losses, overridden by flags, checked
before any image is read."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from cogalign.tokenizers.base import TokenizerError
from cogalign.tokenizers.training.model import PRESETS

DECODER_DTYPES = ("float32", "float16", "bfloat16")
# Settings a resumed run must share with the run it continues (all but steps, threads, logging, workers).
RUN_ONLY = {"steps", "threads", "log_every", "save_every", "workers", "device", "lpips_vgg"}


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "demo"
    # Architecture and losses: None takes the preset's value.
    codes: int | None = None
    ch: int | None = None
    ch_mult: tuple[int, ...] | None = None
    num_res_blocks: int | None = None
    z_channels: int | None = None
    embed_dim: int | None = None
    attn_resolutions: tuple[int, ...] | None = None
    disc_weight: float | None = None
    disc_start: int | None = None
    perceptual_weight: float | None = None
    lr: float | None = None
    # The run.
    steps: int = 2000
    batch_size: int = 8
    crop: int = 128
    seed: int = 0
    threads: int = 1
    dead_code_threshold: float | None = None
    commitment_weight: float = 0.25
    kmeans_latents: int | None = None  # latents for the k-means codebook init; None: 2 x codes
    codebook_weight: float = 1.0
    ema_decay: float = 0.99  # the EMA codebook's decay (vector-quantize-pytorch `decay`)
    decoder_dtype: str = "float32"
    device: str = "cpu"
    bf16: bool = True  # autocast on CUDA
    lpips_vgg: str | None = None
    save_every: int = 500
    log_every: int = 50
    workers: int = 0

    def resolved(self, world_size: int = 1) -> "TrainConfig":
        """Every None filled from the preset (lr: taming's 4.5e-6 x batch x ranks)."""
        if self.preset not in PRESETS:
            raise TokenizerError(f"--preset {self.preset!r}: choose from {', '.join(PRESETS)}")
        p = PRESETS[self.preset]
        vals = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("codes", "ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim", "attn_resolutions",
                  "disc_weight", "disc_start", "perceptual_weight"):
            if vals[k] is None:
                vals[k] = getattr(p, k)
        if vals["lr"] is None:
            vals["lr"] = p.lr if p.lr is not None else 4.5e-6 * self.batch_size * world_size
        vals["ch_mult"], vals["attn_resolutions"] = tuple(vals["ch_mult"]), tuple(vals["attn_resolutions"])
        return replace(self, **vals)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def check(self) -> None:
        """One TokenizerError for the first bad value (call on a resolved config)."""
        positive = {"--steps": self.steps, "--batch-size": self.batch_size, "--codes": self.codes,
                    "--threads": self.threads, "--save-every": self.save_every, "--embed-dim": self.embed_dim}
        for name, v in positive.items():
            if v < 1:
                raise TokenizerError(f"{name} {v}: must be at least 1")
        if self.codes < 2:
            raise TokenizerError(f"--codes {self.codes}: a codebook needs at least 2 codes")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TokenizerError(f"--lr {self.lr}: must be a positive number, e.g. 1e-4")
        for name, v in (("--disc-weight", self.disc_weight), ("--perceptual-weight", self.perceptual_weight),
                        ("--disc-start", self.disc_start), ("--workers", self.workers),
                        ("--commitment-weight", self.commitment_weight), ("--codebook-weight", self.codebook_weight)):
            if not (v >= 0 and math.isfinite(v)):  # NaN fails every comparison: `v < 0` let it through
                raise TokenizerError(f"{name} {v}: must be a finite number, 0 or more")
        if not (0 < self.ema_decay < 1):
            raise TokenizerError(f"--ema-decay {self.ema_decay}: must be between 0 and 1 (exclusive), e.g. 0.99")
        if self.kmeans_latents is not None and self.kmeans_latents < 1:
            raise TokenizerError(f"--kmeans-latents {self.kmeans_latents}: must be at least 1")
        if self.seed < 0:
            raise TokenizerError(f"--seed {self.seed}: must be 0 or more")
        if self.dead_code_threshold is not None and not (self.dead_code_threshold >= 0 and math.isfinite(self.dead_code_threshold)):
            raise TokenizerError(f"--dead-code-threshold {self.dead_code_threshold}: must be 0 or more")
        if self.decoder_dtype not in DECODER_DTYPES:
            raise TokenizerError(f"--decoder-dtype {self.decoder_dtype!r}: choose from {', '.join(DECODER_DTYPES)}")
        from cogalign.tokenizers.training.model import make_ddconfig

        make_ddconfig(self.ch, self.ch_mult, self.num_res_blocks, self.z_channels, self.attn_resolutions)
        f = self.downsample
        if self.crop < f or self.crop % f:
            raise TokenizerError(f"--crop {self.crop}: must be a positive multiple of f={f} (from --ch-mult), e.g. {max(f, self.crop // f * f)}")
        need = 2 ** (PRESETS[self.preset].disc_layers + 2)  # the PatchGAN's 4x4 convolutions
        if self.disc_weight > 0 and self.crop < need:
            raise TokenizerError(f"--crop {self.crop}: the PatchGAN discriminator of this preset needs crops of at least {need} px (or --disc-weight 0)")
        check_device(self.device)
        check_batch_memory(self)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d


def batch_bytes(cfg: "TrainConfig") -> int:
    """A floor on one step's memory: the float32 input batch and the encoder's first feature map
    (the real peak, with every level, the decoder and gradients, is several times more)."""
    return cfg.batch_size * cfg.crop * cfg.crop * (3 + cfg.ch) * 4


def check_batch_memory(cfg: "TrainConfig") -> None:
    """Refuse, before any allocation, a batch whose first feature map alone exceeds this machine's memory."""
    import os

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return
    need = batch_bytes(cfg)
    if need > total:
        fit = max(1, total // max(1, need // cfg.batch_size) // 4)
        raise TokenizerError(f"--batch-size {cfg.batch_size} with --crop {cfg.crop}: one step needs more than "
                             f"{need / 2**30:.0f} GiB, this machine has {total / 2**30:.0f} GiB; use a batch size of "
                             f"at most about {fit} per rank (and more ranks or steps)")


def check_device(device: str) -> None:
    import torch

    if device in ("cpu", "auto"):
        return
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise TokenizerError(f"--device {device}: no CUDA GPU is visible here; use --device cpu or auto")
        idx = device.partition(":")[2]
        if idx and (not idx.isdigit() or int(idx) >= torch.cuda.device_count()):
            raise TokenizerError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0..)")
        return
    raise TokenizerError(f"--device {device!r}: use cpu, cuda, cuda:N or auto")
