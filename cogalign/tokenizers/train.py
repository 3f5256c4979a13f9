"""Train a small taming-architecture VQGAN (`cogalign vq train`), export it in the taming
layout, and evaluate it (`cogalign vq eval`).

The model is taming's Encoder / Decoder with quant_conv / post_quant_conv, and
vector-quantize-pytorch's `VectorQuantize` (EMA codebook, k-means init, dead-code
replacement, Euclidean distance) as the quantizer. The loss is L1 + MSE reconstruction plus
the commitment loss: no discriminator or LPIPS. That is enough for a demo tokenizer or a
first-stage tokenizer trained on your own images; the paper's VQGAN is a full taming
training run (GAN + perceptual losses) that this does not replace.

The export writes `model.safetensors` (encoder.*, quant_conv.*, quantize.embedding.weight,
post_quant_conv.*, decoder.*) and `config.yaml` in the taming layout, so `load_taming` (and
taming itself) reads it; the loaded tokenizer's indices are the nearest codebook entries
(Euclidean), which is what VectorQuantize with use_cosine_sim=False computes.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from cogalign.tokenizers.base import TokenizerError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------

def expand_image_paths(items: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders searched recursively for image files (sorted)."""
    out: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise TokenizerError(f"{p}: no image files found (looked for {', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise TokenizerError(f"{p}: no such image file or folder")
    if not out:
        raise TokenizerError("no images given; pass image files or folders")
    return out


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode any PIL mode to (H, W, 3) uint8 RGB; EXIF orientation applied, alpha on white."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            if im.mode == "I;16" or im.mode == "I":
                arr = np.asarray(im, dtype=np.float64)
                hi = max(arr.max(), 1.0)
                im = Image.fromarray((arr * (255.0 / (65535.0 if hi > 255 else 255.0))).clip(0, 255).astype(np.uint8))
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError) as exc:
        raise TokenizerError(f"{path}: cannot decode this image ({exc})") from None


def resize_rgb(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    if arr.shape[1] == width and arr.shape[0] == height:
        return arr
    return np.asarray(Image.fromarray(arr).resize((width, height), Image.BICUBIC), dtype=np.uint8)


def to_model_input(batch: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1] (x / 127.5 - 1)."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def from_model_output(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 (rounded, clipped)."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


class CropSampler:
    """Random crops (with horizontal flips) from each image at several scales: its native
    size and stretched to each of `square_sizes` (the toolkit resizes images to a square
    working resolution before encoding, so those are the statistics that matter)."""

    def __init__(self, images: Sequence[np.ndarray], crop: int, square_sizes=(256, 448, 672), seed: int = 0):
        self.crop = crop
        self.rng = np.random.default_rng(seed)
        self.views: list[np.ndarray] = []
        for arr in images:
            h, w = arr.shape[:2]
            if min(h, w) < crop:
                s = crop / min(h, w)
                arr = resize_rgb(arr, max(crop, math.ceil(w * s)), max(crop, math.ceil(h * s)))
            self.views.append(arr)
            for size in square_sizes:
                if size >= crop:
                    self.views.append(resize_rgb(arr, size, size))

    def sample(self, n: int) -> np.ndarray:
        c = self.crop
        out = np.empty((n, c, c, 3), dtype=np.uint8)
        for i in range(n):
            v = self.views[self.rng.integers(len(self.views))]
            y = self.rng.integers(v.shape[0] - c + 1)
            x = self.rng.integers(v.shape[1] - c + 1)
            patch = v[y:y + c, x:x + c]
            out[i] = patch[:, ::-1] if self.rng.random() < 0.5 else patch
        return out


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------

def make_ddconfig(ch: int = 32, ch_mult: Sequence[int] = (1, 2, 2, 4), num_res_blocks: int = 1,
                  z_channels: int = 4, attn_resolutions: Sequence[int] = (), resolution: int = 256) -> dict:
    if ch % 32:
        raise TokenizerError(f"ch={ch} must be a multiple of 32 (taming uses GroupNorm with 32 groups)")
    return {
        "double_z": False,
        "z_channels": int(z_channels),
        "resolution": int(resolution),
        "in_channels": 3,
        "out_ch": 3,
        "ch": int(ch),
        "ch_mult": [int(m) for m in ch_mult],
        "num_res_blocks": int(num_res_blocks),
        "attn_resolutions": [int(r) for r in attn_resolutions],
        "dropout": 0.0,
    }


class VQAutoencoder(nn.Module):
    """taming Encoder -> quant_conv -> VectorQuantize -> post_quant_conv -> taming Decoder."""

    def __init__(self, ddconfig: dict, codes: int, embed_dim: int, decay: float = 0.99,
                 dead_code_threshold: float = 2.0, commitment_weight: float = 0.25):
        super().__init__()
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from vector_quantize_pytorch import VectorQuantize

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
            accept_image_fmap=True, commitment_weight=commitment_weight)

    @property
    def codebook(self) -> torch.Tensor:
        """(codes, embed_dim) float32: the VectorQuantize codebook `_codebook.embed[0]`."""
        return self.vq._codebook.embed[0]

    def encode(self, x: torch.Tensor):
        h = self.quant_conv(self.encoder(x))
        q, idx, vq_loss = self.vq(h)
        return q, idx, vq_loss

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(q))

    def forward(self, x: torch.Tensor):
        q, idx, vq_loss = self.encode(x)
        return self.decode(q), idx, vq_loss


# ---------------------------------------------------------------------------------------
# Export / load for evaluation
# ---------------------------------------------------------------------------------------

def taming_config(ddconfig: dict, codes: int, embed_dim: int) -> dict:
    """The taming model yaml for this model (lossconfig: taming's VQ loss, for reference)."""
    return {
        "model": {
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": int(embed_dim),
                "n_embed": int(codes),
                "ddconfig": dict(ddconfig),
                "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"},
            },
        }
    }


def export_taming(model: VQAutoencoder, out_dir: str | Path, decoder_dtype: torch.dtype = torch.float32,
                  metadata: dict | None = None) -> dict[str, Path]:
    """Write out_dir/model.safetensors (taming key names) and out_dir/config.yaml.

    The encoder path (encoder.*, quant_conv.*, quantize.embedding.weight) is always float32;
    `decoder_dtype` (e.g. float16) applies to decoder.* and post_quant_conv.* only, which the
    tokenizer does not use (they serve reconstruction / evaluation)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, mod, dtype in (("encoder.", model.encoder, torch.float32),
                               ("quant_conv.", model.quant_conv, torch.float32),
                               ("post_quant_conv.", model.post_quant_conv, decoder_dtype),
                               ("decoder.", model.decoder, decoder_dtype)):
        for k, v in mod.state_dict().items():
            tensors[prefix + k] = v.detach().to("cpu", dtype).contiguous().clone()
    tensors["quantize.embedding.weight"] = model.codebook.detach().to("cpu", torch.float32).contiguous().clone()
    meta = {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    paths = {"model": out / "model.safetensors", "config": out / "config.yaml"}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata=meta or None)
    tmp.replace(paths["model"])
    os.chmod(paths["model"], 0o644)  # safetensors writes 0600
    with open(paths["config"], "w", encoding="utf-8") as fh:
        yaml.safe_dump(taming_config(model.ddconfig, model.codes, model.embed_dim), fh, sort_keys=False)
    return paths


class _Reconstructor(nn.Module):
    """post_quant_conv + Decoder from a taming checkpoint, for evaluation."""

    def __init__(self, params: dict, tensors: dict[str, torch.Tensor]):
        super().__init__()
        from taming.modules.diffusionmodules.model import Decoder

        dd = params["ddconfig"]
        with contextlib.redirect_stdout(io.StringIO()):
            self.decoder = Decoder(**dd)
        self.post_quant_conv = nn.Conv2d(int(params["embed_dim"]), dd["z_channels"], 1)
        sd = {k: v.float() for k, v in tensors.items() if k.startswith(("decoder.", "post_quant_conv."))}
        self.load_state_dict(sd, strict=True)
        self.eval()

    def forward(self, q):
        return self.decoder(self.post_quant_conv(q))


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def evaluate(tokenizer_dir: str | Path, image_paths: Iterable[str | Path], resolution: int = 256,
             usage_resolution: int = 672, trust_pickle: bool = False) -> dict:
    """Reconstruction PSNR (images stretched to resolution², bicubic; encode -> nearest code
    -> post_quant_conv -> Decoder; mean of per-image PSNR over uint8 pixels) and codebook
    usage (distinct codes / codebook size when every image is encoded whole at
    usage_resolution²)."""
    from cogalign.tokenizers.checkpoints import find_checkpoint, read_config, read_state_dict
    from cogalign.tokenizers.taming import load_taming

    tok = load_taming(tokenizer_dir, device="cpu", trust_pickle=trust_pickle)
    ckpt, cfg = find_checkpoint(tokenizer_dir)
    params, _ = read_config(cfg)
    raw = read_state_dict(ckpt, trust_pickle=trust_pickle)
    raw = {k: v for k, v in raw.items() if k.startswith(("decoder.", "post_quant_conv."))}
    paths = expand_image_paths(image_paths)
    images = [load_rgb(p) for p in paths]
    f = tok.downsample
    res = {"tokenizer": tok.name, "content_hash": tok.content_hash, "images": len(images),
           "resolution": resolution, "usage_resolution": usage_resolution}
    if resolution % f or usage_resolution % f:
        raise TokenizerError(f"resolution {resolution} / {usage_resolution} must be multiples of f={f}")
    with torch.inference_mode():
        if raw and tok.quantizer == "vq":
            rec_model = _Reconstructor(tok.params, {k: v for k, v in raw.items()})
            per = []
            for p, arr in zip(paths, images):
                x = resize_rgb(arr, resolution, resolution)[None]
                idx = torch.from_numpy(tok.encode(x))
                q = tok.quantize.embedding.weight[idx].permute(0, 3, 1, 2)
                rec = from_model_output(rec_model(q))
                per.append(psnr_db(x, rec))
            res["psnr_db"] = float(np.mean(per))
            res["psnr_db_per_image"] = {Path(p).name: round(v, 2) for p, v in zip(paths, per)}
        else:
            res["psnr_db"] = None  # no decoder in the checkpoint
        used: set[int] = set()
        for arr in images:
            x = resize_rgb(arr, usage_resolution, usage_resolution)[None]
            used.update(np.unique(tok.encode(x)).tolist())
    res["codes_used"] = len(used)
    res["codebook_size"] = tok.codebook_size
    res["codebook_usage"] = len(used) / tok.codebook_size
    return res


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

def train_vq(
    image_paths: Iterable[str | Path],
    out_dir: str | Path,
    codes: int = 4096,
    ch: int = 32,
    ch_mult: Sequence[int] = (1, 2, 2, 4),
    num_res_blocks: int = 1,
    z_channels: int = 4,
    embed_dim: int = 4,
    attn_resolutions: Sequence[int] = (),
    steps: int = 2000,
    batch_size: int = 8,
    crop: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    threads: int | None = 1,
    dead_code_threshold: float | None = None,
    commitment_weight: float = 0.25,
    decoder_dtype: str = "float32",
    device: str = "cpu",
    log: Callable[[str], None] | None = print,
    log_every: int = 50,
) -> dict:
    """Train a VQ autoencoder on random crops of the images and export it (taming layout) to
    out_dir. Returns the training metrics (also written to out_dir/train_metrics.json).

    dead_code_threshold: VectorQuantize's threshold_ema_dead_code. By default
    min(2, 0.05 * latents per step / codes): codes used far less than average are re-seeded
    from the batch; a fixed 2 would, with a small batch and a big codebook, re-seed nearly
    every code at every step.
    """
    log = log or (lambda s: None)
    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    paths = expand_image_paths(image_paths)
    images = [load_rgb(p) for p in paths]
    f = 2 ** (len(ch_mult) - 1)
    if crop % f:
        raise TokenizerError(f"crop={crop} must be a multiple of f={f}")
    sampler = CropSampler(images, crop, seed=seed)
    latents_per_step = batch_size * (crop // f) ** 2
    if dead_code_threshold is None:
        dead_code_threshold = min(2.0, 0.05 * latents_per_step / codes)
    dd = make_ddconfig(ch, ch_mult, num_res_blocks, z_channels, attn_resolutions)
    model = VQAutoencoder(dd, codes, embed_dim, dead_code_threshold=dead_code_threshold,
                          commitment_weight=commitment_weight).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"vq train: {len(images)} images, {codes} codes, f={f}, ch={ch} ch_mult={list(ch_mult)} "
        f"res_blocks={num_res_blocks}, {n_params:,} parameters, {steps} steps of {batch_size}x{crop}^2 crops, "
        f"dead-code threshold {dead_code_threshold:.3g}, device {dev}")

    # k-means init of the codebook on enough latents (>= 2 per code) from the start encoder.
    model.train()
    init_crops = max(batch_size, math.ceil(2 * codes / (crop // f) ** 2))
    with torch.no_grad():
        hs = [model.quant_conv(model.encoder(to_model_input(sampler.sample(min(64, init_crops - s))).to(dev)))
              for s in range(0, init_crops, 64)]
        model.vq(torch.cat(hs))
        del hs

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99))
    warmup = min(100, max(1, steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    hist = {"loss": [], "mse": []}
    ema_mse = None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = to_model_input(sampler.sample(batch_size)).to(dev)
        rec, idx, vq_loss = model(x)
        mse = F.mse_loss(rec, x)
        loss = F.l1_loss(rec, x) + mse + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        m = float(mse.detach())
        ema_mse = m if ema_mse is None else 0.98 * ema_mse + 0.02 * m
        if step % log_every == 0 or step == steps - 1:
            # x in [-1, 1]: PSNR over [0, 255] = 10 log10(4 / mse)
            psnr = 10 * math.log10(4.0 / max(ema_mse, 1e-12))
            used = int(torch.unique(idx).numel())
            hist["loss"].append(round(loss.item(), 5))
            hist["mse"].append(round(m, 6))
            log(f"step {step:6d}  loss {loss.item():.4f}  mse {m:.5f}  train-psnr~{psnr:.2f} dB  "
                f"codes in batch {used}  lr {lr_at(step):.2e}  {time.perf_counter() - t_start:.0f}s")

    model.eval()
    train_seconds = time.perf_counter() - t_start
    metrics = {
        "images": [str(p) for p in paths],
        "codes": codes, "downsample": f, "ch": ch, "ch_mult": list(ch_mult),
        "num_res_blocks": num_res_blocks, "z_channels": z_channels, "embed_dim": embed_dim,
        "attn_resolutions": list(attn_resolutions), "steps": steps, "batch_size": batch_size,
        "crop": crop, "lr": lr, "seed": seed, "threads": threads,
        "dead_code_threshold": dead_code_threshold, "commitment_weight": commitment_weight,
        "parameters": n_params, "train_seconds": round(train_seconds, 1),
        "final_train_mse_ema": ema_mse,
        "final_train_psnr_db": 10 * math.log10(4.0 / max(ema_mse or 1e-12, 1e-12)),
        "history_every": log_every, "history": hist,
        "torch": torch.__version__,
    }
    ddtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[decoder_dtype]
    model_cpu = model.to("cpu")
    export_taming(model_cpu, out_dir, decoder_dtype=ddtype,
                  metadata={"producer": "cogalign vq train", "steps": steps, "codes": codes, "seed": seed})
    out = Path(out_dir)
    with open(out / "train_metrics.json", "w", encoding="utf-8") as fh:
        json.dump(metrics, fh, indent=1)
    log(f"vq train: wrote {out / 'model.safetensors'} and {out / 'config.yaml'} in {train_seconds:.0f}s")
    metrics["model"] = model_cpu
    return metrics
