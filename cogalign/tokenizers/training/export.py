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

from cogalign.images import psnr_db
from cogalign.tokenizers.base import TokenizerError
from cogalign.tokenizers.decoder import load_decoder
from cogalign.tokenizers.training.data import collect_images, load_rgb, resize_rgb

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
             image_root: str | Path | None = None) -> dict:
    """Reconstruction PSNR (images stretched to resolution², bicubic; encode -> nearest code
    -> post_quant_conv -> Decoder; mean of per-image PSNR over uint8 pixels) and codebook
    usage (distinct codes / codebook size when every image is encoded whole at
    usage_resolution²). Per-image PSNR is keyed by the image's path as found."""
    from cogalign.tokenizers.checkpoints import find_checkpoint, read_state_dict
    from cogalign.tokenizers.taming import load_taming

    for name, v in (("--resolution", resolution), ("--usage-resolution", usage_resolution)):
        if v < 1:
            raise TokenizerError(f"{name} {v}: must be a positive multiple of the tokenizer's downsampling factor")
    tok = load_taming(tokenizer_dir, device="cpu", trust_pickle=trust_pickle)
    f = tok.downsample
    for name, v in (("--resolution", resolution), ("--usage-resolution", usage_resolution)):
        if v % f:
            raise TokenizerError(f"{name} {v}: must be a multiple of f={f}, e.g. {max(f, v // f * f)}")
    ckpt, _ = find_checkpoint(tokenizer_dir)
    dec = decoder_tensors(read_state_dict(ckpt, trust_pickle=trust_pickle))
    refs = collect_images(image_paths, image_root).refs[:max_images]
    images = [load_rgb(r) for r in refs]
    res = {"tokenizer": tok.name, "content_hash": tok.content_hash, "images": len(images),
           "resolution": resolution, "usage_resolution": usage_resolution}
    with torch.inference_mode():
        if dec and tok.quantizer == "vq":
            rec_model = load_decoder(tokenizer_dir, trust_pickle=trust_pickle)  # refuses weights that do not fit
            per = {}
            for r, arr in zip(refs, images):
                x = resize_rgb(arr, resolution, resolution)[None]
                per[r.name] = psnr_db(x, rec_model.decode(tok.encode(x)))
            res["psnr_db"] = float(np.mean(list(per.values())))
            res["psnr_db_per_image"] = {k: round(v, 2) for k, v in per.items()}
        else:
            res["psnr_db"] = None  # no decoder in the checkpoint
        used: set[int] = set()
        for arr in images:
            used.update(np.unique(tok.encode(resize_rgb(arr, usage_resolution, usage_resolution)[None])).tolist())
    res["codes_used"] = len(used)
    res["codebook_size"] = tok.codebook_size
    res["codebook_usage"] = len(used) / tok.codebook_size
    return res
