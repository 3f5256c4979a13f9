"""Export a trained model in the taming layout (`model.safetensors` + `config.yaml`, read by
`load_taming` and by taming itself) and evaluate a tokenizer folder (`cogalign vq eval`)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import yaml

from cogalign.inputs.images import psnr_db
from cogalign.tokenizers.base import TokenizerError
from cogalign.tokenizers.decoder import load_decoder
from cogalign.tokenizers.training.data import collect_images, load_rgb, resize_rgb, to_model_input

MODEL_FILE, CONFIG_FILE, METRICS_FILE = "model.safetensors", "config.yaml", "train_metrics.json"


def taming_config(ddconfig: dict, codes: int, embed_dim: int) -> dict:
    """The taming model yaml for this model (lossconfig: taming's VQ loss, for reference)."""
    return {"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": int(embed_dim), "n_embed": int(codes), "ddconfig": dict(ddconfig),
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}}}


def export_taming(model, out_dir: str | Path, decoder_dtype: torch.dtype = torch.float32,
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
    # One key: safetensors writes its metadata map in no fixed order, and same seed must give same bytes.
    meta = {"cogalign": json.dumps(metadata, sort_keys=True)} if metadata else None
    paths = {"model": out / MODEL_FILE, "config": out / CONFIG_FILE}
    tmp = out / (MODEL_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(paths["model"])
    os.chmod(paths["model"], 0o644)  # safetensors writes 0600
    with open(paths["config"], "w", encoding="utf-8") as fh:
        yaml.safe_dump(taming_config(model.ddconfig, model.codes, model.embed_dim), fh, sort_keys=False)
    return paths




def decoder_tensors(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """decoder.* and post_quant_conv.*, also when stored under a prefix (latent diffusion's
    `first_stage_model.`)."""
    from cogalign.tokenizers.checkpoints import DECODER_PREFIXES, strip_prefix

    return {k: v for k, v in strip_prefix(raw).items() if k.startswith(DECODER_PREFIXES)}


def evaluate(tokenizer_dir: str | Path, image_paths: Iterable[str | Path], resolution: int = 256,
             usage_resolution: int = 672, trust_pickle: bool = False, max_images: int | None = None,
             image_root: str | Path | None = None, name: str | None = None, progress: bool = False,
             lpips_vgg: str | Path | None = None, allow_absolute: bool = False) -> dict:
    """Reconstruction quality and codebook use, one image at a time (never all in memory).

    Quality (images stretched to resolution², bicubic; encode -> nearest code -> post_quant_conv
    -> Decoder): mean per-image PSNR over uint8 pixels, SSIM (Gaussian window 11, sigma 1.5,
    torchmetrics), and LPIPS (VGG) when VGG16 weights are found. Codebook use (every image encoded
    whole at usage_resolution²): codes used, dead codes, perplexity, entropy, the histogram.
    rFID is not computed: it needs Inception weights, which cogalign never downloads.
    Per-image PSNR is keyed by the image's path as found; undecodable images are counted and named."""
    from cogalign.expand.progress import Progress
    from cogalign.tokenizers.checkpoints import find_checkpoint, read_state_dict
    from cogalign.tokenizers.taming import check_fits_memory, load_taming

    for flag, v in (("--resolution", resolution), ("--usage-resolution", usage_resolution)):
        if v < 1:
            raise TokenizerError(f"{flag} {v}: must be a positive multiple of the tokenizer's downsampling factor")
    if max_images is not None and max_images < 1:
        raise TokenizerError(f"--max-images {max_images}: must be at least 1")
    tok = load_taming(tokenizer_dir, device="cpu", trust_pickle=trust_pickle, name=name)
    f = tok.downsample
    for flag, v in (("--resolution", resolution), ("--usage-resolution", usage_resolution)):
        if v % f:
            raise TokenizerError(f"{flag} {v}: must be a multiple of f={f}, e.g. {max(f, v // f * f)}")
        check_fits_memory(tok.params, v, v, flag)
    ckpt, _ = find_checkpoint(tokenizer_dir)
    stored = bool(decoder_tensors(read_state_dict(ckpt, trust_pickle=trust_pickle)))
    has_decoder = stored and tok.quantizer == "vq"
    no_quality = (None if has_decoder else "no decoder in the checkpoint" if not stored
                  else "a Gumbel model: decoding its indices is not supported")
    rec_model = load_decoder(tokenizer_dir, trust_pickle=trust_pickle) if has_decoder else None
    lpips_model, notes = None, ["rfid: not computed (needs Inception weights, which cogalign never downloads)"]
    if rec_model is not None:
        from cogalign.tokenizers.training.losses import find_vgg_weights, load_lpips

        vgg = find_vgg_weights(lpips_vgg)
        if vgg is None:
            notes.append("lpips: not computed (no VGG16 weights: give --lpips-vgg PATH or $COGALIGN_LPIPS_VGG)")
        else:
            lpips_model = load_lpips(vgg)
        try:
            import torchmetrics  # noqa: F401
        except ImportError:
            notes.append("ssim: not computed (needs torchmetrics: pip install \"cogalign[vqgan]\")")
    ssim_on = rec_model is not None and not any(n.startswith("ssim") for n in notes)
    refs = collect_images(image_paths, image_root, allow_absolute).refs[:max_images]
    counts = np.zeros(tok.codebook_size, dtype=np.int64)
    psnr, psnrs, ssim, lp, bad = {}, [], [], [], {}  # psnrs: every image, as ssim and lp (psnr: by path)
    with torch.inference_mode(), Progress(len(refs), progress, label="images") as bar:
        for r in refs:
            try:
                arr = load_rgb(r)
            except TokenizerError as e:
                bad[r.name] = str(e)
                bar.advance()
                continue
            if rec_model is not None:
                x = resize_rgb(arr, resolution, resolution)[None]
                rec = rec_model.decode(tok.encode(x))
                psnr[r.name] = psnr_db(x, rec)
                psnrs.append(psnr[r.name])
                if ssim_on:
                    ssim.append(_ssim(x, rec))
                if lpips_model is not None:
                    lp.append(float(lpips_model(to_model_input(x), to_model_input(rec)).mean()))
            idx = tok.encode(resize_rgb(arr, usage_resolution, usage_resolution)[None])
            counts += np.bincount(idx.ravel(), minlength=tok.codebook_size)
            bar.advance(True)
    if len(bad) == len(refs):
        raise TokenizerError(f"none of the {len(refs)} images could be decoded; first: {next(iter(bad.values()))}")
    res = {"tokenizer": tok.name, "content_hash": tok.content_hash, "images": len(refs) - len(bad),
           "images_undecodable": bad, "resolution": resolution, "usage_resolution": usage_resolution,
           "psnr_db": float(np.mean(psnrs)) if psnrs else None,  # None: no decoder in the checkpoint
           "ssim": float(np.mean(ssim)) if ssim else None,
           "lpips": float(np.mean(lp)) if lp else None, "rfid": None, "notes": notes,
           "quality_not_measured": no_quality}
    if psnr:
        res["psnr_db_per_image"] = {k: round(v, 2) for k, v in psnr.items()}
    res.update(codebook_stats(counts))
    return res


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two (1, H, W, 3) uint8 images (torchmetrics: Gaussian window 11, sigma 1.5)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    ta, tb = (torch.from_numpy(np.array(v)).permute(0, 3, 1, 2).double() / 255.0 for v in (a, b))
    return float(structural_similarity_index_measure(tb, ta, data_range=1.0))


def codebook_stats(counts: np.ndarray) -> dict:
    """Codebook use from per-code counts: used and dead codes, perplexity exp(H), entropy H in bits
    (its maximum is log2(codebook size)), and the histogram itself."""
    total = int(counts.sum())
    p = counts[counts > 0] / max(total, 1)
    entropy = float(-(p * np.log2(p)).sum()) if total else 0.0
    used = int((counts > 0).sum())
    return {"codes_used": used, "codebook_size": int(counts.size), "codebook_usage": used / counts.size,
            "dead_codes": int(counts.size - used), "perplexity": float(2 ** entropy), "entropy_bits": entropy,
            "max_entropy_bits": float(np.log2(counts.size)), "indices_counted": total,
            "code_histogram": counts.tolist()}
